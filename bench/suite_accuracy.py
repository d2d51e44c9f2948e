"""Produce the accuracy figures we track on the offline suite (design.md section 7), by hand.

    python bench/suite_accuracy.py                      # default preset (8 tasks), ~30-60 min on 2 cores
    python bench/suite_accuracy.py --preset ci          # 4 tasks, < 10 min
    python bench/suite_accuracy.py --mass-layer encoder.layer.2.intermediate.dense   # full MASS at more layers

Writes the suite's report (report.json, report.md, plots) and prints the targets: MASS average normalized
accuracy >= 95%, MASS >= TSV-M + 5 points, TSV-M > Task Arithmetic, routing accuracy per task, and the
routing-layer sweep. Experts and evaluations are cached, so a rerun with other MASS settings is quick.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from massmerge import progress
from massmerge.suite import PRESET_FINETUNE, SuiteConfig, run_suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", choices=["ci", "default", "wide"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "massmerge" / "suite")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--mass-layer", action="append", default=[], help="extra routing layer for full MASS")
    parser.add_argument("--eta", type=float, default=0.2)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--eps", type=float, default=0.3, help="negative = de-redundancy off")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    progress.set_enabled(sys.stderr.isatty())
    config = SuiteConfig(preset=args.preset, finetune=PRESET_FINETUNE[args.preset], mass_layers=tuple(args.mass_layer),
                         eta=args.eta, top_k=args.top_k, eps=None if args.eps < 0 else args.eps)  # fmt: skip
    out = args.out or Path("massmerge-suite") / args.preset
    report = run_suite(config, data_root=args.data_dir, cache_dir=args.cache_dir, out_dir=out)
    print("\nrouting-layer sweep (mean top-1 routing accuracy):")
    for row in report["layer_sweep"]:
        print(f"  {row['layer']:<40} {100 * row['mean']:5.1f}  (true task selected {100 * row['selection_recall']:.1f})")
    print(f"\nreport: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
