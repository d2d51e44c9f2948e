"""Weight averaging: the mean of the experts, ``theta_0 + mean_t delta_t`` (alpha is ignored)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from massmerge.merging.common import StateDict, TaskVectors, check_task_vectors, finalize, mean_delta
from massmerge.progress import track


def merge(base: Mapping[str, torch.Tensor], task_vectors: TaskVectors, *, alpha: float | None = None) -> StateDict:
    """Average of the experts. ``alpha`` is accepted for a uniform signature and ignored, as design.md says."""
    keys = check_task_vectors(task_vectors)
    merged = {key: mean_delta(task_vectors, key) for key in track(keys, "weight_average")}
    return finalize(base, merged, 1.0)
