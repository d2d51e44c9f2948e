"""TSV-C, Task Singular Vectors compression (Gargiulo et al.): each task's model with its matrix deltas cut
to rank ``k = floor(min(m, n) * rank_fraction)``, the task known. An oracle bound for what MASS can reach.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from massmerge.errors import OptionError
from massmerge.choices import SVDMethod
from massmerge.lowrank import rank_for, rank_fraction_for, truncated_svd
from massmerge.merging.common import (
    StateDict,
    TaskVectors,
    check_alpha,
    check_task_vectors,
    finalize,
)
from massmerge.merging.names import DEFAULT_ALPHA
from massmerge.progress import track
from massmerge.task_vectors import split_matrix, work_dtype


def merge(
    base: Mapping[str, torch.Tensor],
    task_vectors: TaskVectors,
    *,
    task: int,
    alpha: float = DEFAULT_ALPHA,
    rank_fraction: float | None = None,
    svd: SVDMethod = "auto",
    dtype: torch.dtype | None = None,
) -> StateDict:
    """TSV-C: the model of task ``task`` with each matrix delta cut to rank k (an oracle compression bound).

    Non-matrix keys keep the task's own delta: with the task known there is nothing to average.
    """
    keys = check_task_vectors(task_vectors, minimum=1)
    alpha = check_alpha(alpha)
    if not 0 <= task < len(task_vectors):
        raise OptionError(f"--task must be in [0, {len(task_vectors) - 1}], got {task}")
    fraction = rank_fraction_for(len(task_vectors), rank_fraction)
    matrices, others = split_matrix(keys, base)
    tv = task_vectors[task]
    merged: StateDict = {key: tv[key].to(work_dtype(tv[key], dtype)) for key in others}
    for key in track(matrices, "tsv_c"):
        k = rank_for(base[key].shape, fraction)
        merged[key] = truncated_svd(tv[key], k, method=svd, dtype=work_dtype(tv[key], dtype)).reconstruct()
    return finalize(base, merged, alpha)
