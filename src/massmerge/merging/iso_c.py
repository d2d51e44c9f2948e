"""Iso-C (Marczak et al., "No Task Left Behind"): the SVD of the summed task matrix with every singular value
replaced by their mean (an isotropic spectrum). Non-matrix keys take the mean of the deltas.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from massmerge.merging.common import (
    StateDict,
    TaskVectors,
    check_alpha,
    check_task_vectors,
    finalize,
    mean_delta,
    sum_delta,
)
from massmerge.merging.names import DEFAULT_ALPHA
from massmerge.progress import track
from massmerge.task_vectors import split_matrix


def iso_c_matrix(summed: torch.Tensor) -> torch.Tensor:
    """``mean(s) * U V^T`` from the thin SVD of the summed task matrix."""
    U, s, Vh = torch.linalg.svd(summed, full_matrices=False)
    return s.mean() * (U @ Vh)


def merge(
    base: Mapping[str, torch.Tensor],
    task_vectors: TaskVectors,
    *,
    alpha: float = DEFAULT_ALPHA,
    dtype: torch.dtype | None = None,
) -> StateDict:
    """Iso-C: ``theta_0 + alpha * iso(sum_t delta_t)`` for matrices, mean of non-matrix deltas."""
    keys = check_task_vectors(task_vectors)
    alpha = check_alpha(alpha)
    matrices, others = split_matrix(keys, base)
    merged: StateDict = {key: mean_delta(task_vectors, key, dtype) for key in others}
    for key in track(matrices, "iso_c"):
        merged[key] = iso_c_matrix(sum_delta(task_vectors, key, dtype))
    return finalize(base, merged, alpha)
