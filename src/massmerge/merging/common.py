"""Pieces shared by the static merges: applying alpha, casting back, non-matrix means, TSV-M of factors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from massmerge.errors import OptionError
from massmerge.lowrank import LowRank, polar
from massmerge.task_vectors import work_dtype

StateDict = dict[str, torch.Tensor]
TaskVectors = Sequence[Mapping[str, torch.Tensor]]


def check_task_vectors(task_vectors: TaskVectors, *, minimum: int = 2) -> list[str]:
    """Keys shared by the task vectors (in the first one's order); refuse fewer than ``minimum`` tasks."""
    if len(task_vectors) < minimum:
        raise OptionError(f"--experts: need at least {minimum} experts to merge, got {len(task_vectors)}")
    keys = list(task_vectors[0])
    for index, tv in enumerate(task_vectors[1:], start=1):
        if set(tv) != set(keys):
            diff = sorted(set(keys) ^ set(tv))
            raise OptionError(f"task vector {index} has different keys from task vector 0 (e.g. '{diff[0]}')")
    return keys


def finalize(
    base: Mapping[str, torch.Tensor], merged_delta: Mapping[str, torch.Tensor], alpha: float
) -> StateDict:
    """``base + alpha * merged_delta`` over every base key, computed in float32 and cast to the base dtype.

    Keys without a delta (integer buffers, filtered-out keys) are copied from the base unchanged.
    """
    out: StateDict = {}
    for key in base:
        tensor = base[key]
        if key in merged_delta:
            compute = torch.promote_types(merged_delta[key].dtype, torch.float32)
            out[key] = (tensor.to(compute) + alpha * merged_delta[key].to(compute)).to(tensor.dtype)
        else:
            out[key] = tensor.clone()
    return out


def mean_delta(task_vectors: TaskVectors, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean of the tasks' deltas for one key, read one expert at a time."""
    first = task_vectors[0][key]
    dtype = work_dtype(first, dtype)
    total = first.to(dtype).clone()
    for tv in task_vectors[1:]:
        total += tv[key].to(dtype)
    return total / len(task_vectors)


def sum_delta(task_vectors: TaskVectors, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum of the tasks' deltas for one key, read one expert at a time."""
    first = task_vectors[0][key]
    dtype = work_dtype(first, dtype)
    total = first.to(dtype).clone()
    for tv in task_vectors[1:]:
        total += tv[key].to(dtype)
    return total


def tsv_merge_factors(factors: Sequence[LowRank]) -> torch.Tensor:
    """TSV-M of per-task factors: ``polar([U_t]) diag([s_t]) polar([V_t])^T``.

    For one task this is exactly its rank-k reconstruction (the polar factor of an orthonormal U is U).
    """
    if not factors:
        raise ValueError("tsv_merge_factors needs at least one task's factors")
    (m, n), dtype = factors[0].shape, factors[0].s.dtype
    factors = [f for f in factors if f.rank > 0]
    if not factors:  # every task left this matrix unchanged
        return torch.zeros(m, n, dtype=dtype)
    U = torch.cat([f.U for f in factors], dim=1)
    s = torch.cat([f.s for f in factors])
    V = torch.cat([f.V for f in factors], dim=1)
    return (polar(U) * s) @ polar(V).T


def check_alpha(alpha: float) -> float:
    """alpha must be a finite number; negative values are allowed (they are a user's explicit choice)."""
    if not isinstance(alpha, (int, float)) or alpha != alpha or abs(alpha) == float("inf"):
        raise OptionError(f"--alpha must be a finite number, got {alpha}")
    return float(alpha)


def default_rank_fraction(num_tasks: int, rank_fraction: float | None) -> float:
    """design.md default: 1/T."""
    fraction = 1.0 / num_tasks if rank_fraction is None else rank_fraction
    if not 0.0 < fraction <= 1.0:
        raise OptionError(f"--rank-fraction must be in (0, 1], got {fraction}")
    return fraction
