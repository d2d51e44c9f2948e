"""Shared pieces of the benchmarks: model shapes, random experts, MASS parts, timing, tables and JSON output.

Models are built from HF configs with random weights (no download): MiniLM-L6 (BERT, 6 x 384, 22.7M params)
and ViT-B/16 (12 x 768, 86M params). Experts are the base plus a *full-rank* random delta, the worst case for
storage and SVD time (a real fine-tuning delta is numerically full rank too).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
DELTA_SCALE = 0.01


def minilm(depth: int = 6) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=depth, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False).eval()


def vit_b(depth: int = 12) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=768, num_hidden_layers=depth, num_attention_heads=12, intermediate_size=3072,
                       image_size=224, patch_size=16)
    torch.manual_seed(0)
    return ViTModel(config, add_pooling_layer=False).eval()


MODELS: dict[str, Callable[..., nn.Module]] = {"minilm": minilm, "vit_b": vit_b}


def random_expert(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Base + full-rank Gaussian delta (scale 0.01) on every floating tensor."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + DELTA_SCALE * torch.randn(v.shape, generator=gen, dtype=v.dtype)) if v.is_floating_point()
            else v.clone() for k, v in base.items()}


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def status_bytes(field: str) -> int | None:
    """A line of /proc/self/status (``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile``) in bytes (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def factors_bytes(factors: Any) -> int:
    """Bytes the ``ExpertFactors`` hold: U, s and V of every task and matrix, and the non-matrix deltas."""
    total = sum(t.numel() * t.element_size() for per in factors.matrices.values() for f in per for t in (f.U, f.s, f.V))
    return total + sum(t.numel() * t.element_size() for per in factors.non_matrix.values() for t in per)


def write_heads(directory: Path, count: int, width: int) -> list[Path]:
    """``count`` seeded 5-class linear heads files of ``width`` features (task names task0, task1, ...), for the
    benchmarks that run ``massmerge build``."""
    from massmerge.checkpoints import save_state_dict

    paths = []
    for t in range(count):
        paths.append(directory / f"head{t}.safetensors")
        weight = torch.randn(5, width, generator=torch.Generator().manual_seed(t))
        save_state_dict({"weight": weight}, paths[-1], metadata={"task": f"task{t}"})
    return paths


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark to its current RSS (Linux ``clear_refs`` 5), so a later
    :func:`peak_rss_bytes` measures only what follows (imports and set-up no longer hide the merge's peak)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def current_rss_bytes() -> int:
    return status_bytes("VmRSS") or peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or the last :func:`reset_peak_rss`."""
    return status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]



def timed_process(command: list[str]) -> tuple[float, float]:
    """(wall, CPU seconds of the child) of one whole process, from ``os.wait4``; a failed child stops the run
    with its stderr's tail."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime

def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain Markdown table (also readable on a terminal)."""
    def fmt(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    widths = [max([len(c), *(len(fmt(r.get(c, ""))) for r in rows)]) for c in columns]  # rows may be empty
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")).rjust(w) for c, w in zip(columns, widths)) + " |")
    return "\n".join(lines)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": {"python": sys.version.split()[0], "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "platform": platform.platform()}, **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def mib(count: int | float) -> float:
    return float(count) / 2**20


def routing_layer(model: nn.Module) -> str:
    """First MLP linear of block round(0.75 * depth), found by the adapters' generic rule (HF names vary)."""
    from massmerge.adapters import get_adapter

    return get_adapter("text").routing_layer(model)


def orthonormal(rows: int, cols: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols))[0]


def shaped_factors(state: dict[str, torch.Tensor], tasks: int, *, eps: float | None = 0.3) -> Any:
    """Factors with the exact shapes MASS keeps for ``tasks`` full-rank experts (rank 1/T per matrix),
    orthonormal U/V and small descending spectra, as real task vectors give; sizes and speed depend only on
    the shapes, so no SVD is run."""
    from massmerge.lowrank import LowRank, rank_for
    from massmerge.mass import ExpertFactors

    names = [f"task{t}" for t in range(tasks)]
    factors = ExpertFactors(task_names=names, rank_fraction=1.0 / tasks)
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if value.ndim == 2:
            k = rank_for(value.shape, 1.0 / tasks)
            factors.matrices[key] = [
                LowRank(orthonormal(value.shape[0], k), 0.05 * torch.rand(k).sort(descending=True).values,
                        orthonormal(value.shape[1], k))
                for _ in names
            ]
        else:
            factors.non_matrix[key] = [0.01 * torch.randn(value.shape) for _ in names]
    factors.apply_deredundancy(eps)
    return factors

