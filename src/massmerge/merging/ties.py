"""TIES-Merging (Yadav et al.), following the official code.

Per task, keep the entries whose magnitude is in the top ``density`` fraction of the task's WHOLE flattened
task vector (all keys together); elect each entry's sign as the sign of the sum of the trimmed values (where
that sum is exactly 0, the majority sign: the sign of the sum of all elected signs); average the trimmed
values that agree with the elected sign; return ``theta_0 + alpha * merged``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from massmerge.errors import OptionError
from massmerge.merging.common import StateDict, TaskVectors, check_alpha, check_task_vectors, finalize
from massmerge.progress import track
from massmerge.task_vectors import work_dtype


def magnitude_threshold(task_vector: Mapping[str, torch.Tensor], keys: Sequence[str], density: float) -> float:
    """The smallest magnitude kept for this task: the official ``kthvalue(d - int(d * density))`` of |tv|."""
    flat = torch.cat([task_vector[key].reshape(-1).to(work_dtype(task_vector[key])).abs() for key in keys])
    numel = flat.numel()
    kth = numel - int(numel * density)
    if kth <= 0:
        return 0.0
    return float(flat.kthvalue(kth).values)


def _trimmed(tv: Mapping[str, torch.Tensor], key: str, threshold: float) -> torch.Tensor:
    value = tv[key].to(work_dtype(tv[key]))
    return torch.where(value.abs() >= threshold, value, torch.zeros_like(value))


def _elected_sign(trimmed: torch.Tensor, majority: int) -> torch.Tensor:
    sign = torch.sign(trimmed.sum(dim=0))
    return torch.where(sign == 0, torch.full_like(sign, float(majority)), sign)


def _disjoint_mean(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    count = agree.sum(dim=0).clamp(min=1)
    return selected.sum(dim=0) / count


def merge(
    base: Mapping[str, torch.Tensor],
    task_vectors: TaskVectors,
    *,
    alpha: float = 1.0,
    density: float = 0.2,
) -> StateDict:
    """TIES over every key; ``density`` is the kept fraction per task (``--ties-density``)."""
    keys = check_task_vectors(task_vectors)
    alpha = check_alpha(alpha)
    if not 0.0 < density <= 1.0:
        raise OptionError(f"--ties-density must be in (0, 1], got {density}")
    thresholds = [magnitude_threshold(tv, keys, density) for tv in track(task_vectors, "ties: trim")]
    sign_total = 0.0
    for key in track(keys, "ties: elect"):
        trimmed = torch.stack([_trimmed(tv, key, th) for tv, th in zip(task_vectors, thresholds)])
        sign_total += float(torch.sign(trimmed.sum(dim=0)).sum())
    majority = (sign_total > 0) - (sign_total < 0)  # official: sign of the sum, 0 stays 0
    merged: StateDict = {}
    for key in track(keys, "ties: merge"):
        trimmed = torch.stack([_trimmed(tv, key, th) for tv, th in zip(task_vectors, thresholds)])
        merged[key] = _disjoint_mean(trimmed, _elected_sign(trimmed, majority))
    return finalize(base, merged, alpha)
