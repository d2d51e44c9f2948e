"""Inference throughput (samples/s) at batch 1, 16, 64: plain base forward vs MASS, in one run, with ratios.

Every MASS row is the one :class:`~massmerge.mass.MASSModel` that ``massmerge predict`` serves, with its
first pass (to the routing layer) and routing included. Rows: ``base`` (one plain forward), ``mass_one_set``
(every sample served with the same task set), ``mass_mixed`` (samples of T tasks mixed: sample i gets
{i mod T} or {i mod T, i+1 mod T}, up to 2T distinct sets per batch, the ``batched`` strategy: ONE second
forward), ``mass_mixed_grouped`` (the same sets, ``grouped``: one second forward per set), ``mass_routed``
(the router's own sets on these random inputs) and ``reference_mixed`` (the dense per-set rebuild, the tests'
reference). Merged sets are cached across calls (warm, as in serving). Factors have the exact shapes of T
full-rank experts (values random: speed does not depend on them). For the real CLI on real texts see
``bench/predict_throughput.py``.

Run by hand:  python bench/inference_throughput.py [--model minilm|vit_b] [--tasks 8] [--seq-len 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MODELS,
    median_time,
    routing_layer,
    shaped_factors,
    table,
    write_json,
)

from massmerge.adapters import get_adapter  # noqa: E402
from massmerge.heads import ZeroShotHead  # noqa: E402
from massmerge.mass.config import make_serve_settings  # noqa: E402
from massmerge.mass.model import MASSModel  # noqa: E402
from massmerge.mass.model import group_by_task_set  # noqa: E402


def make_batch(model_name: str, size: int, seq_len: int) -> object:
    if model_name == "vit_b":
        return {"pixel_values": torch.randn(size, 3, 224, 224)}
    return {"input_ids": torch.randint(1000, 30000, (size, seq_len)), "attention_mask": torch.ones(size, seq_len, dtype=torch.long)}


def mixed_sets(size: int, tasks: int) -> torch.Tensor:
    selected = torch.zeros(size, tasks, dtype=torch.bool)
    for i in range(size):
        selected[i, i % tasks] = True
        if (i // tasks) % 2:
            selected[i, (i + 1) % tasks] = True
    return selected


def with_sets(model: MASSModel, batch: object, selected: torch.Tensor) -> object:
    """A routed call whose second pass serves the given task sets (the first pass and router still run)."""
    routing = model.route(batch)
    feats = model.second_pass_features(batch, group_by_task_set(selected))
    return model.choose(feats, selected, routing.probs)


def num_groups(selected: torch.Tensor) -> int:
    return len(group_by_task_set(selected))


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per run, timing the runs round-robin so load drift on a shared machine hits all alike."""
    for fn in runs.values():
        fn()  # warm-up: merged-set caches, first-pass trace
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            samples[name].append(median_time(fn, 1, warmup=0))
    return {name: sorted(times)[len(times) // 2] for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=sorted(MODELS))
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MODELS[args.model]()
    family = "clip" if args.model == "vit_b" else "text"
    adapter = get_adapter("text") if family == "text" else None
    features = adapter.features if adapter else (lambda m, b: m(**b).last_hidden_state[:, 0])
    pool = adapter.pool if adapter else (lambda a, b: a[:, 0])
    factors = shaped_factors(model.state_dict(), args.tasks)
    heads = [ZeroShotHead(torch.randn(10, model.config.hidden_size)) for _ in range(args.tasks)]
    config = make_serve_settings(routing_layers=(routing_layer(model),))
    fast = MASSModel(model, factors, heads, config, pool=pool, features=features)
    grouped = fast.with_settings(strategy="grouped")
    reference = fast.with_settings(strategy="reference")
    rows = []
    with torch.no_grad():
        for size in args.batches:
            batch = make_batch(args.model, size, args.seq_len)
            mixed = mixed_sets(size, args.tasks)
            one = torch.zeros(size, args.tasks, dtype=torch.bool)
            one[:, :2] = True
            repeats = args.repeats if size < 64 else max(3, args.repeats // 2)
            runs = {
                "base": lambda: features(model, batch),
                "mass_one_set": lambda: with_sets(fast, batch, one),
                "mass_mixed": lambda: with_sets(fast, batch, mixed),
                "mass_mixed_grouped": lambda: with_sets(grouped, batch, mixed),
                "mass_routed": lambda: fast(batch),
                "reference_mixed": lambda: with_sets(reference, batch, mixed),
            }
            groups = {"base": 0, "mass_one_set": 1, "mass_mixed": num_groups(mixed),
                      "mass_mixed_grouped": num_groups(mixed),
                      "mass_routed": num_groups(fast.route(batch).selected), "reference_mixed": num_groups(mixed)}
            times = interleaved_medians(runs, repeats)
            for name, seconds in times.items():
                rows.append({"model": args.model, "batch": size, "mode": name, "groups": groups[name],
                             "samples_per_s": size / seconds, "ratio_vs_base": times["base"] / seconds})
                print(f"  batch {size} {name}: {size / seconds:.1f}/s", file=sys.stderr)
    print(table(rows, ["model", "batch", "mode", "groups", "samples_per_s", "ratio_vs_base"]))
    print(f"\nwrote {write_json('inference_throughput', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
