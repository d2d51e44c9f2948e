"""Artifact size / base size vs T for MiniLM-L6 and ViT-B/16, fp32 and fp16 bases, by factor storage dtype,
at the design ranks (``max_size`` 0) and cut to ``massmerge build``'s default budget (``--max-size 2.1``).

Sizes depend only on tensor shapes, ranks and dtypes, so the factors here are random tensors of exactly the
shapes a full-rank expert gives (``k = floor(min(m, n) / T)`` per matrix, ``_common.shaped_factors``; real
fine-tuning deltas are numerically full rank); this keeps the run to a minute instead of hours of SVDs. The artifact is the real one
``save_artifact`` writes (base embedded, factors, non-matrix deltas, 10-class heads, manifest).

Run by hand:  python bench/artifact_size.py [--models minilm vit_b] [--tasks 2 4 8 12 16 20]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MODELS,
    routing_layer,
    shaped_factors,
    state_bytes,
    table,
    write_json,
)

from massmerge.artifact import artifact_bytes, save_artifact  # noqa: E402
from massmerge.mass.storage import parse_dtype, storage_dtype  # noqa: E402
from massmerge.heads import ZeroShotHead  # noqa: E402
from massmerge.mass import MASSModel, make_serve_settings  # noqa: E402
from massmerge.artifact.manifest import factor_header_bytes  # noqa: E402
from massmerge.mass.budget import fit_to_size  # noqa: E402

CONFIGS = [("float32", None), ("float32", "float32"), ("float16", None)]  # (base dtype, factor dtype; None=auto)


def measure(model_name: str, tasks: int, base_dtype: str, factor_dtype: str | None, max_size: float,
            tmp: Path) -> dict:
    model = MODELS[model_name]().to(getattr(torch, base_dtype))
    state = model.state_dict()
    base = state_bytes(state)
    factors = shaped_factors(state, tasks, eps=None)
    heads = [ZeroShotHead(torch.randn(10, model.config.hidden_size)) for _ in range(tasks)]
    store = parse_dtype(factor_dtype) if factor_dtype else storage_dtype(getattr(torch, base_dtype))
    scale = 1.0
    if max_size:
        fit = fit_to_size(factors, base_bytes=base, max_size=max_size, store=store,
                          extra_bytes=factor_header_bytes(factors)
                          + sum(h.weight.numel() * h.weight.element_size() for h in heads))
        factors, scale = fit.factors, fit.rank_scale
    mass = MASSModel(model, factors, heads, make_serve_settings(routing_layers=(routing_layer(model),)))
    out = tmp / f"{model_name}-{tasks}"
    save_artifact(mass, out, factor_dtype=store, rank_scale=scale)
    size = artifact_bytes(out)
    shutil.rmtree(out)
    return {"model": model_name, "T": tasks, "base_dtype": base_dtype, "factor_dtype": factor_dtype or "auto",
            "max_size": max_size, "rank_scale": scale, "base_MiB": base / 2**20, "artifact_MiB": size / 2**20,
            "ratio": size / base, "le_2.1x": size / base <= 2.1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "vit_b"], choices=sorted(MODELS))
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 4, 8, 12, 16, 20])
    parser.add_argument("--max-size", nargs="+", type=float, default=[0.0, 2.1], help="0: design ranks")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="massmerge-size-") as tmp:
        for name in args.models:
            for base_dtype, factor_dtype in CONFIGS:
                for max_size in args.max_size:
                    for tasks in args.tasks:
                        rows.append(measure(name, tasks, base_dtype, factor_dtype, max_size, Path(tmp)))
                        print(f"  {rows[-1]}", file=sys.stderr)
    print(table(rows, ["model", "T", "base_dtype", "factor_dtype", "max_size", "rank_scale", "base_MiB",
                       "artifact_MiB", "ratio", "le_2.1x"]))
    print(f"\nwrote {write_json('artifact_size', {'rows': rows})}")


if __name__ == "__main__":
    main()
