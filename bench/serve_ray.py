"""``massmerge serve --ray`` on a single-node Ray cluster started here: deploy, load, compare, stop.

What it reports: seconds from the command to a ready deployment (Ray's cluster start included), then for each
client count (default 8 and 64) the throughput (inputs/s), p50 / p95 / p99 latency, errors and whether every
answer equals the same inputs through the :class:`Predictor` in one offline batch (task, class and task set
exactly; router probabilities to 1e-5); then the exit code and seconds of a SIGTERM stop. Not a CI test: Ray's
start-up alone takes tens of seconds of CI's 2 cores (docs/SERVING.md).

Loopback only (127.0.0.1, a free port), bounded in requests and time; needs ``pip install 'massmerge[ray]'``.

    python bench/serve_ray.py --artifact mass-art/ [--requests 128] [--clients 8 64] [--replicas 1]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import table, write_json
from serve_load import (level_row, make_requests, offline_batch, offline_predictor, print_problems, run_level,
                        start_server, stop_server)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from predict_throughput import suite_texts, synthetic_artifact

    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or synthetic_artifact(Path(tmp) / "art")
        requests = make_requests(suite_texts(4096, args.seed), args.requests, args.seed)
        distinct = list(dict.fromkeys(text for request in requests for text in request))
        offline, offline_wall, offline_cpu = offline_batch(offline_predictor(artifact, distinct, None), distinct)
        count = len(distinct)
        offline_rate = count / offline_wall
        print(f"offline batch: {count} inputs, {offline_wall:.2f} s wall, {offline_cpu:.2f} s CPU: "
              f"{offline_rate:.1f} inputs/s", flush=True)
        command = [sys.executable, "-m", "massmerge", "serve", str(artifact), "--ray", "--port", str(free_port()),
                   "--num-replicas", str(args.replicas), "--request-timeout-s", "120"]
        start = time.perf_counter()
        process, address = start_server(command, env={"RAY_USAGE_STATS_ENABLED": "0"})
        ready_s = time.perf_counter() - start
        print(f"Ray Serve deployment ready at {address} in {ready_s:.1f} s", flush=True)
        rows = []
        try:
            asyncio.run(run_level(address, requests[:8], 4, 60.0))  # warm-up
            for clients in args.clients:
                result = asyncio.run(run_level(address, requests, clients, args.time_limit))
                rows.append(level_row(clients, requests, result, float("nan"), offline_rate, offline))
                print(table([rows[-1]], [c for c in rows[-1] if c not in ("error sample", "differing", "server CPU s")]),
                      flush=True)
        finally:
            code, exit_s = stop_server(process)
    columns = [c for c in rows[0] if c not in ("error sample", "differing", "server CPU s")] if rows else []
    print(f"\nRay Serve, {args.replicas} replica(s), artifact {args.artifact or 'synthetic'}: ready in {ready_s:.1f} s; "
          f"offline batch {offline_rate:.1f} inputs/s; SIGTERM: exit {code} in {exit_s:.1f} s")
    print(table(rows, columns))
    print_problems(rows)
    path = write_json("serve_ray", {"artifact": str(args.artifact or "synthetic"), "ready_s": ready_s,
                                    "offline_inputs_per_s": offline_rate, "levels": rows, "exit": code,
                                    "exit_s": exit_s, "command": sys.argv})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
