"""CPU seconds massmerge spends inside SVD calls alone during one static merge (the floor of the SVD methods).

Runs ``massmerge.merging.merge`` in-process on the experts (read as ``massmerge merge`` reads them) with
``torch.linalg.svd`` and ``torch.svd_lowrank`` wrapped to add up the process CPU time spent inside them.
Usage: python svd_floor.py METHOD BASE_DIR EXPERT_DIR... --json OUT
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch


def timed(fn, totals: dict[str, float]):  # noqa: ANN001, ANN201
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            totals["svd_cpu_s"] += time.process_time() - start
            totals["calls"] += 1
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("base")
    parser.add_argument("experts", nargs="+")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    totals = {"svd_cpu_s": 0.0, "calls": 0}
    torch.linalg.svd = timed(torch.linalg.svd, totals)
    torch.svd_lowrank = timed(torch.svd_lowrank, totals)

    from massmerge import merging
    from massmerge.checkpoints import load_state_dict, open_checkpoint
    from massmerge.task_vectors import CheckedTaskVector

    base = load_state_dict(args.base)
    tvs = [CheckedTaskVector(base, open_checkpoint(p), name=p) for p in args.experts]
    start = time.process_time()
    merging.merge(args.method, base, tvs)
    totals["merge_cpu_s"] = time.process_time() - start
    with open(args.json, "w") as handle:
        json.dump(totals, handle)


if __name__ == "__main__":
    main()
