"""Load test of ``massmerge serve`` on loopback: 1, 8 and 64 concurrent clients sending mixed-task requests of
1-16 inputs, against the same inputs through the :class:`Predictor` in one offline batch, in the same run.

What it reports per client count: throughput (inputs/s), p50 / p95 / p99 request latency, errors, the server's
CPU seconds beside the wall time, and whether every answer equals the offline batch's (task, class and task set
exactly; router probabilities to 1e-5, the float rounding a different batch's padding moves). Target at 64
clients: >= 0.8x the offline throughput, zero errors, identical answers. The offline batch is timed before the
server starts and again after it stops (steady state: two warm-up calls first); ratios use the faster of the two.

Bounded: ``--requests`` requests per client count (the same seeded list each time), each level stopped after
``--time-limit`` seconds (clients start no new request then); the server listens on 127.0.0.1 only, on a free
port, and is stopped (SIGTERM, exit code checked) by this script. Text artifacts only.

The artifact: ``--artifact DIR``; without it, predict_throughput.py's synthetic one (the real all-MiniLM-L6-v2
base, the distinct preset's 8 zero-shot heads, seeded low-rank experts: routing is not meaningful, its cost is).
Texts: the distinct preset's test texts, shuffled, so requests mix tasks.

    python bench/serve_load.py --artifact mass-art/ [--requests 256] [--clients 1 8 64] [--time-limit 90]
        [--max-batch-size 128] [--max-wait-ms 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import table, write_json

ADDRESS = re.compile(r"on (http://127\.0\.0\.1:\d+)")
PROBS_TOLERANCE = 1e-5
START_TIMEOUT_S = 180.0
WARMUP_CALLS = 2


def make_requests(texts: list[str], count: int, seed: int, low: int = 1, high: int = 16) -> list[list[str]]:
    """``count`` requests of ``low``-``high`` texts each, drawn in order from the shuffled pool (seeded)."""
    rng = random.Random(seed)
    out, at = [], 0
    for _ in range(count):
        size = rng.randint(low, high)
        out.append([texts[(at + i) % len(texts)] for i in range(size)])
        at += size
    return out


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc), children not included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(command: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """A server process (its own session, so a signal reaches it alone) and the address it printed."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, **(env or {})})
    assert process.stdout is not None
    deadline, seen = time.monotonic() + START_TIMEOUT_S, []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise SystemExit(f"the server exited {process.wait()}: {''.join(seen)[-2000:]}")
        seen.append(line)
        match = ADDRESS.search(line)
        if match:
            wait_ready(match.group(1))
            return process, match.group(1)
    process.kill()
    raise SystemExit(f"the server did not start in {START_TIMEOUT_S:g} s: {''.join(seen)[-2000:]}")


def wait_ready(address: str, timeout: float = START_TIMEOUT_S) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{address}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{address} never became ready")


def stop_server(process: subprocess.Popen[str], timeout: float = 120.0) -> tuple[int, float]:
    """SIGTERM; (exit code, seconds to exit)."""
    start = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    return code, time.perf_counter() - start


async def run_level(address: str, requests: list[list[str]], clients: int, time_limit: float,
                    headers: dict[str, str] | None = None) -> dict[str, Any]:
    """``clients`` concurrent clients working through ``requests``; answers by request index, latencies, errors."""
    import httpx

    answers: dict[int, list[dict[str, Any]]] = {}
    latencies: list[float] = []
    errors: list[str] = []
    queue = iter(range(len(requests)))
    deadline = time.monotonic() + time_limit
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=address, timeout=120.0, limits=limits, headers=headers) as client:
        async def worker() -> None:
            for index in queue:
                if time.monotonic() > deadline:
                    return
                start = time.perf_counter()
                try:
                    response = await client.post("/v1/predict", json={"inputs": requests[index]})
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                latencies.append(time.perf_counter() - start)
                if response.status_code == 200:
                    answers[index] = response.json()["predictions"]
                else:
                    errors.append(f"{response.status_code}: {response.text[:200]}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"answers": answers, "latencies": latencies, "errors": errors, "wall": wall}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def compare(requests: list[list[str]], answers: dict[int, list[dict[str, Any]]],
            offline: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], float]:
    """(the answers that differ from the offline batch in task, label, class or task set, each with both rows;
    the largest router probability difference)."""
    differing, worst = [], 0.0
    for index, rows in answers.items():
        for text, row in zip(requests[index], rows):
            want = offline[text]
            if any(row[key] != want[key] for key in ("task", "label", "class", "selected")):
                differing.append({"text": text, "served": row, "offline": want})
            worst = max(worst, *(abs(row["probs"][t] - want["probs"][t]) for t in want["probs"]))
    return differing, worst


def offline_predictor(artifact: Path, texts: list[str], device: str | None) -> Any:
    """The Predictor of the offline batch, warmed up on the texts by two calls (the task sets' merged weights
    cached, as they are in the server after its first levels; a probe found the second call of a fresh
    predictor still 6x slower than the third, so one warm-up call is not enough)."""
    from massmerge.artifact.predictor import Predictor

    predictor = Predictor(artifact, device=device)
    for _ in range(WARMUP_CALLS):
        predictor.predict(texts)
    return predictor


def offline_batch(predictor: Any, texts: list[str]) -> tuple[dict[str, dict[str, Any]], float, float]:
    """Every distinct text through one ``Predictor.predict`` call: (rows by text, wall, CPU seconds)."""
    cpu, start = time.process_time(), time.perf_counter()
    rows = predictor.predict(texts)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {text: row for text, row in zip(texts, rows)}, wall, cpu


def level_row(clients: int, requests: list[list[str]], result: dict[str, Any], cpu: float,
              offline_rate: float, offline: dict[str, dict[str, Any]]) -> dict[str, Any]:
    answered = sum(len(requests[i]) for i in result["answers"])
    rate = answered / result["wall"]
    differing, worst = compare(requests, result["answers"], offline)
    lat = [x * 1000 for x in result["latencies"]]
    return {"clients": clients, "requests": len(result["answers"]), "inputs": answered,
            "wall s": round(result["wall"], 2), "server CPU s": round(cpu, 2), "inputs/s": round(rate, 1),
            "x offline": round(rate / offline_rate, 3), "p50 ms": round(percentile(lat, 50), 1),
            "p95 ms": round(percentile(lat, 95), 1), "p99 ms": round(percentile(lat, 99), 1),
            "errors": len(result["errors"]), "mismatched": len(differing), "max |dprob|": f"{worst:.1e}",
            "error sample": result["errors"][:3], "differing": differing[:5]}


def print_problems(rows: list[dict]) -> None:
    """Each client count's error sample and every answer that differs from the offline batch."""
    for row in rows:
        if row["error sample"]:
            print(f"{row['clients']} clients, errors: {row['error sample']}")
        for diff in row["differing"]:
            print(f"{row['clients']} clients, differs from the offline batch: {diff}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path)
    parser.add_argument("--requests", type=int, default=256, help="requests per client count")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--time-limit", type=float, default=90.0, help="seconds per client count, at most")
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--max-wait-ms", type=float, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="serve_load")
    args = parser.parse_args()

    from predict_throughput import suite_texts, synthetic_artifact

    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or synthetic_artifact(Path(tmp) / "art")
        requests = make_requests(suite_texts(4096, args.seed), args.requests, args.seed)
        distinct = list(dict.fromkeys(text for request in requests for text in request))
        predictor = offline_predictor(artifact, distinct, args.device)
        offline, offline_wall, offline_cpu = offline_batch(predictor, distinct)
        offline_count = len(distinct)
        print(f"offline batch (before the server): {offline_count} inputs in {offline_wall:.2f} s wall, "
              f"{offline_cpu:.2f} s CPU: {offline_count / offline_wall:.1f} inputs/s", flush=True)
        command = [sys.executable, "-m", "massmerge", "serve", str(artifact), "--port", "0",
                   "--max-queue", str(max(2048, 16 * max(args.clients))), "--request-timeout-s", "120"]
        for flag, value in (("--max-batch-size", args.max_batch_size), ("--max-wait-ms", args.max_wait_ms),
                            ("--device", args.device)):
            if value is not None:
                command += [flag, str(value)]
        process, address = start_server(command)
        try:
            asyncio.run(run_level(address, requests[:8], 4, 60.0))  # warm-up: tokenizer, caches, set merges
            results = []
            for clients in args.clients:
                cpu = process_cpu_seconds(process.pid)
                results.append((clients, asyncio.run(run_level(address, requests, clients, args.time_limit)),
                                process_cpu_seconds(process.pid) - cpu))
                print(f"{clients} clients: {sum(len(requests[i]) for i in results[-1][1]['answers'])} inputs in "
                      f"{results[-1][1]['wall']:.2f} s", flush=True)
        finally:
            code, exit_s = stop_server(process)
        # the offline batch again, now that the server is gone: on a shared machine the load moves, so the
        # ratio is taken against the faster of the two (the conservative choice)
        _, again_wall, again_cpu = offline_batch(predictor, distinct)
        print(f"offline batch (after the server): {again_wall:.2f} s wall, {again_cpu:.2f} s CPU", flush=True)
        offline_wall, offline_cpu = min((offline_wall, offline_cpu), (again_wall, again_cpu))
        offline_rate = offline_count / offline_wall
        rows = [level_row(clients, requests, result, cpu, offline_rate, offline) for clients, result, cpu in results]
    columns = [c for c in rows[0] if c not in ("error sample", "differing")] if rows else []
    print(f"\nartifact: {args.artifact or 'synthetic (predict_throughput.synthetic_artifact)'}; offline batch "
          f"{offline_rate:.1f} inputs/s ({offline_count} inputs, {offline_wall:.2f} s wall, {offline_cpu:.2f} s CPU; "
          f"the faster of before and after); server stopped by SIGTERM: exit {code} in {exit_s:.2f} s")
    print(table(rows, columns))
    print_problems(rows)
    path = write_json(args.name, {"artifact": str(args.artifact or "synthetic"), "offline": {
        "inputs": offline_count, "wall_s": offline_wall, "cpu_s": offline_cpu, "inputs_per_s": offline_rate,
        "after_wall_s": again_wall, "after_cpu_s": again_cpu},
        "levels": rows, "server_exit": code, "server_exit_s": exit_s, "command": sys.argv})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
