"""Helpers of the server tests: the tiny text artifact, and real ``massmerge serve`` processes on free loopback
ports, stopped by the test that started them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tiny_models import build_tiny_text_artifact

START_TIMEOUT_S = 60.0
ADDRESS = re.compile(r"on (http://127\.0\.0\.1:\d+)")


build_text_artifact = build_tiny_text_artifact  # the tiny text artifact under ``root`` (``root/art``)


class Server:
    """A running ``massmerge serve`` process: its address, a client, and its output once stopped."""

    def __init__(self, process: subprocess.Popen[str], address: str, key: str | None) -> None:
        self.process, self.address = process, address
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=address, headers=headers, timeout=30.0)
        self.output = ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait; the exit code (the process is killed if it outlives ``timeout``)."""
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.output += self.process.stdout.read() if self.process.stdout else ""
        return code


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    source = Path(__file__).resolve().parents[2] / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(source), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def start_server(artifact: Path, *flags: str, key: str | None = None, env: dict[str, str] | None = None) -> Server:
    """``massmerge serve ARTIFACT --port 0 FLAGS`` started and ready (its address read from its first line)."""
    process = subprocess.Popen([sys.executable, "-m", "massmerge", "serve", str(artifact), "--port", "0", *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**_env(), **(env or {})})
    deadline, seen = time.monotonic() + START_TIMEOUT_S, []
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            process.wait(10)
            raise AssertionError(f"massmerge serve exited {process.returncode}: {''.join(seen)}")
        seen.append(line)
        match = ADDRESS.search(line)
        if match:
            server = Server(process, match.group(1), key)
            server.output = "".join(seen)
            _wait_ready(server)
            return server
    process.kill()
    raise AssertionError(f"massmerge serve did not start: {''.join(seen)}")


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if server.client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("massmerge serve never became ready")


@contextmanager
def serving(artifact: Path, *flags: str, key: str | None = None, env: dict[str, str] | None = None
            ) -> Iterator[Server]:
    """A server for the ``with`` block, stopped (SIGTERM) at its end whatever happens."""
    server = start_server(artifact, *flags, key=key, env=env)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()
