"""Iso-CTS (Marczak et al., "No Task Left Behind"), following the official code.

Keep the top ``common_fraction`` of the summed task matrix's spectrum as a common subspace, give each task its own top directions of its residual outside it, orthogonalize the stacked bases (polar) and
flatten the spectrum to its mean. Non-matrix keys take the mean of the deltas; alpha scales the whole delta.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from massmerge.errors import OptionError
from massmerge.lowrank import polar
from massmerge.merging.common import (
    KeyDeltas,
    StateDict,
    TaskVectors,
    check_alpha,
    check_task_vectors,
    finalize,
    mean_delta,
)
from massmerge.merging.names import DEFAULT_ALPHA, ISO_CTS_COMMON_FRACTION
from massmerge.progress import track
from massmerge.task_vectors import split_matrix


def iso_cts_sizes(rank: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common directions k_c, directions per task n_t), exactly as the official code rounds them."""
    common = int(rank * common_fraction)
    specific_total = round((rank - common) / num_tasks) * num_tasks
    common = rank - specific_total
    return common, (rank - common) // num_tasks


def iso_cts_matrix(task_matrices: Sequence[torch.Tensor], common_fraction: float) -> torch.Tensor:
    """Iso-CTS for one matrix given every task's delta of it (float32 or float64).

    ``task_matrices`` is walked twice (the sum, then each task's residual), one matrix at a time, so a lazy
    sequence (:class:`~massmerge.merging.common.KeyDeltas`) keeps one dense task matrix alive, not T.
    """
    summed = _sum(task_matrices)
    U, s, Vh = torch.linalg.svd(summed, full_matrices=False)
    rank = s.shape[0]
    k_c, n_t = iso_cts_sizes(rank, len(task_matrices), common_fraction)
    u_common = U[:, :k_c]
    us, ss, vs = [], [], []
    for index in range(len(task_matrices)):
        delta = task_matrices[index]
        residual = delta - u_common @ (u_common.T @ delta)
        u_t, s_t, vh_t = torch.linalg.svd(residual, full_matrices=False)
        us.append(u_t[:, :n_t].clone())  # copies: a view would keep the whole [m, r] factor alive per task
        ss.append(s_t[:n_t].clone())
        vs.append(vh_t[:n_t].clone())
    stacked_u = torch.cat([*us, u_common], dim=1)
    stacked_s = torch.cat([*ss, s[:k_c]])
    stacked_vh = torch.cat([*vs, Vh[:k_c]], dim=0)
    flat = stacked_s.mean()
    return flat * (polar(stacked_u) @ polar(stacked_vh.T).T)


def _sum(task_matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    total = task_matrices[0].clone()
    for index in range(1, len(task_matrices)):
        total += task_matrices[index]
    return total


def merge(
    base: Mapping[str, torch.Tensor],
    task_vectors: TaskVectors,
    *,
    alpha: float = DEFAULT_ALPHA,
    common_fraction: float = ISO_CTS_COMMON_FRACTION,
    dtype: torch.dtype | None = None,
) -> StateDict:
    """Iso-CTS with a common subspace of ``common_fraction`` of the spectrum (``--common-fraction``)."""
    keys = check_task_vectors(task_vectors)
    alpha = check_alpha(alpha)
    if not 0.0 <= common_fraction <= 1.0:
        raise OptionError(f"--common-fraction must be in [0, 1], got {common_fraction}")
    matrices, others = split_matrix(keys, base)
    merged: StateDict = {key: mean_delta(task_vectors, key, dtype) for key in others}
    for key in track(matrices, "iso_cts"):
        merged[key] = iso_cts_matrix(KeyDeltas(task_vectors, key, dtype), common_fraction)
    return finalize(base, merged, alpha)
