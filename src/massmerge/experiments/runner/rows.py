"""One report row, the shape every runner module returns (absolute and normalized accuracy per task)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from massmerge.experiments import metrics as ev

Params = Mapping[str, torch.Tensor]


def row(kind: str, accuracy: Mapping[str, float], expert: Mapping[str, float] | None, **extra: Any) -> dict[str, Any]:
    """One report row: absolute and normalized accuracy per task and averaged over tasks (unweighted)."""
    normalized = ev.normalized_accuracy(accuracy, expert) if expert else {}
    return {"kind": kind, "accuracy": dict(accuracy), "normalized": normalized, "avg_accuracy": ev.mean(accuracy),
            "avg_normalized": ev.mean(normalized), **extra}  # fmt: skip
