"""Task Arithmetic (Ilharco et al.): ``theta_0 + alpha * sum_t delta_t`` over every key."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from massmerge.merging.common import StateDict, TaskVectors, check_alpha, check_task_vectors, finalize, sum_delta
from massmerge.progress import track


def default_alpha(num_tasks: int) -> float:
    """design.md: 0.3 / 0.2 / 0.1 for 8 / 14 / 20 tasks (fewer tasks take the larger value)."""
    if num_tasks <= 8:
        return 0.3
    if num_tasks <= 14:
        return 0.2
    return 0.1


def merge(base: Mapping[str, torch.Tensor], task_vectors: TaskVectors, *, alpha: float | None = None) -> StateDict:
    """Sum of task vectors scaled by alpha (default by the number of tasks)."""
    keys = check_task_vectors(task_vectors)
    alpha = default_alpha(len(task_vectors)) if alpha is None else check_alpha(alpha)
    merged = {key: sum_delta(task_vectors, key) for key in track(keys, "task_arithmetic")}
    return finalize(base, merged, alpha)
