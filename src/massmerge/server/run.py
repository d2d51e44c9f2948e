"""Running the app: who may connect (loopback unless a key or an explicit flag), the listening socket, and a
graceful shutdown.

Shutdown (SIGTERM, or SIGINT / Ctrl-C): the server first drains. ``/readyz`` answers 503 (a load balancer stops
sending), new predictions get 503 with Retry-After, and everything queued or running is answered. When nothing
is in flight, or after ``--grace-s``, uvicorn closes the connections and the process exits 0. A second signal
exits at once. A process killed hard (SIGKILL) sends nothing more: every answer is one JSON body sent whole with
its Content-Length, so a client sees a closed connection, never a partial answer.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from massmerge.errors import OptionError
from massmerge.server.limits import API_KEY_ENV, ServerLimits

LOOPBACK_NAMES = ("localhost",)
NO_KEY_FLAG = "--allow-no-key"


def is_loopback(host: str) -> bool:
    """Only this machine can connect to ``host`` (127.0.0.0/8, ::1 or localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, allow_no_key: bool) -> str | None:
    """Refuse to open the model to a network without a key unless asked to; the warning line when asked."""
    if api_key is not None or is_loopback(host):
        return None
    why = (f"binding to {host} lets every machine that can reach it use the model and read its metrics, and "
           f"there is no --api-key (or ${API_KEY_ENV})")
    if not allow_no_key:
        raise OptionError(f"--host: {why}; set a key, or pass {NO_KEY_FLAG} if the network is yours to trust")
    return f"warning: {why} ({NO_KEY_FLAG} given)"


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (``port`` 0: a free one, read back from the socket)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise OptionError(f"--host/--port: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def address_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(app: Any, sock: socket.socket, limits: ServerLimits, state: Any, *, log_level: str = "warning",
        on_drain: Callable[[], None] = lambda: None) -> None:
    """Serve ``app`` on ``sock`` until a signal, then drain (see the module doc); returns when done."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server with a drain before its own shutdown, and no signal re-raised after it (uvicorn
        re-raises the signal it caught, which would end the process with -SIGTERM instead of exit code 0)."""

        deadline: float | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.deadline is not None:  # a second signal: stop now
                self.should_exit = self.force_exit = True
                return
            self.deadline = time.monotonic() + limits.grace_s
            state.draining = True
            on_drain()

        async def on_tick(self, counter: int) -> bool:
            if await super().on_tick(counter):
                return True
            if self.deadline is None or (state.in_flight or app.state.batcher.busy) and time.monotonic() < self.deadline:
                return False
            self.config.timeout_graceful_shutdown = max(1.0, self.deadline - time.monotonic())  # one grace in all
            return True

    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=max(1, int(limits.grace_s)))
    server = DrainingServer(config)
    server.run(sockets=[sock])


__all__ = ["NO_KEY_FLAG", "address_of", "check_exposure", "is_loopback", "listen", "run"]
