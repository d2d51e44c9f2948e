"""TSV-M, Task Singular Vectors merging (Gargiulo et al.).

Per matrix, each task keeps its top ``k = floor(min(m, n) * rank_fraction)`` singular triplets (default
``rank_fraction = 1/T``). TSV-M stacks them and replaces the stacked U and V by their polar factors, so the
tasks' subspaces stop interfering; non-matrix keys take the mean of the deltas.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from massmerge.choices import SVDMethod
from massmerge.lowrank import rank_for, rank_fraction_for, truncated_svd
from massmerge.merging.common import (
    StateDict,
    TaskVectors,
    check_alpha,
    check_task_vectors,
    finalize,
    mean_delta,
    tsv_merge_factors,
)
from massmerge.merging.names import DEFAULT_ALPHA
from massmerge.progress import track
from massmerge.task_vectors import split_matrix, work_dtype


def _deltas(task_vectors: TaskVectors, key: str):  # noqa: ANN202 - a generator of tensors
    """One task's delta at a time, so only one dense expert matrix is alive while the others are factors."""
    return (tv[key] for tv in task_vectors)


def merge(
    base: Mapping[str, torch.Tensor],
    task_vectors: TaskVectors,
    *,
    alpha: float = DEFAULT_ALPHA,
    rank_fraction: float | None = None,
    svd: SVDMethod = "auto",
    dtype: torch.dtype | None = None,
) -> StateDict:
    """TSV-M: ``theta_0 + alpha * TSV-M(all tasks)``."""
    keys = check_task_vectors(task_vectors)
    alpha = check_alpha(alpha)
    fraction = rank_fraction_for(len(task_vectors), rank_fraction)
    matrices, others = split_matrix(keys, base)
    merged: StateDict = {key: mean_delta(task_vectors, key, dtype) for key in others}
    for key in track(matrices, "tsv_m"):
        k = rank_for(base[key].shape, fraction)
        factors = [truncated_svd(delta, k, method=svd, dtype=work_dtype(delta, dtype)) for delta in _deltas(task_vectors, key)]
        merged[key] = tsv_merge_factors(factors)
    return finalize(base, merged, alpha)
