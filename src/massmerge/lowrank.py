"""Truncated SVD and polar factors, the linear algebra under TSV-M, Iso-C/CTS and MASS.

All factorizations run in float32 by default (float64 on request) whatever the checkpoint dtype. The exact
thin SVD is the default for small matrices; a randomized truncated SVD (``torch.svd_lowrank`` with
oversampling and power iterations) is used automatically when the kept rank is a small part of the matrix,
where it meets the 1e-4 relative accuracy bound of design.md (checked by a test against the exact path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from massmerge.choices import SVDMethod
from massmerge.errors import OptionError


# Randomized SVD only pays off for big matrices with a small kept rank.
RANDOMIZED_MIN_SIZE = 512
RANDOMIZED_MAX_RANK_RATIO = 0.25
RANDOMIZED_OVERSAMPLE = 16
RANDOMIZED_POWER_ITERS = 6
# Tall or wide matrices (e.g. a 30522 x 384 word-embedding delta) take the float64 Gram path of the exact SVD.
GRAM_MIN_ASPECT = 4
GRAM_MAX_SIDE = 4096
GRAM_BLOCK_ROWS = 1024  # rows of A read into float64 at a time: 3 MiB blocks at width 384 (build memory, issue 10)


@dataclass
class LowRank:
    """``U diag(s) V^T`` with U: [m, k], s: [k], V: [n, k] (orthonormal columns, s descending)."""

    U: torch.Tensor
    s: torch.Tensor
    V: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.V.shape[0])

    def reconstruct(self) -> torch.Tensor:
        """The dense [m, n] matrix these factors stand for."""
        return (self.U * self.s) @ self.V.T

    def to(self, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None) -> LowRank:
        """The factors on ``device`` in ``dtype`` (``to(torch.float64)`` casts only; a no-op for what is already
        there)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        return LowRank(self.U.to(device=device, dtype=dtype), self.s.to(device=device, dtype=dtype),
                       self.V.to(device=device, dtype=dtype))

    def numel(self) -> int:
        """Stored numbers: k (m + n + 1)."""
        m, n = self.shape
        return self.rank * (m + n + 1)


def rank_fraction_for(num_tasks: int, rank_fraction: float | None) -> float:
    """The rank fraction of T tasks: the given one, or design.md's default 1/T; checked to lie in (0, 1]."""
    fraction = 1.0 / num_tasks if rank_fraction is None else rank_fraction
    if not 0.0 < fraction <= 1.0:
        raise OptionError(f"--rank-fraction must be in (0, 1], got {fraction}")
    return fraction


def rank_for(shape: tuple[int, ...] | torch.Size, rank_fraction: float) -> int:
    """``floor(min(m, n) * rank_fraction)``, at least 1 (a task always keeps its top direction)."""
    if not 0.0 < rank_fraction <= 1.0:
        raise OptionError(f"--rank-fraction must be in (0, 1], got {rank_fraction}")
    m, n = int(shape[0]), int(shape[1])
    return max(1, math.floor(min(m, n) * rank_fraction + 1e-9))


def _use_randomized(m: int, n: int, k: int) -> bool:
    return min(m, n) >= RANDOMIZED_MIN_SIZE and (k + RANDOMIZED_OVERSAMPLE) <= RANDOMIZED_MAX_RANK_RATIO * min(m, n)


def truncated_svd(
    matrix: torch.Tensor, k: int, *, method: SVDMethod = "auto", dtype: torch.dtype = torch.float32
) -> LowRank:
    """Top-``k`` singular triplets of ``matrix`` computed in ``dtype``, without numerically-zero ones.

    ``auto`` picks the randomized SVD for large matrices with ``k`` well below ``min(m, n)``, else exact.
    Directions whose singular value is below the numerical-rank tolerance are dropped (so a rank-r delta,
    e.g. from a LoRA adapter, keeps at most r): their singular vectors are arbitrary, and TSV-M's polar factor
    and the router's subspaces would otherwise depend on that arbitrary choice.
    """
    if matrix.ndim != 2:
        raise ValueError(f"truncated_svd needs a 2-D tensor, got shape {list(matrix.shape)}")
    m, n = matrix.shape
    k = max(1, min(int(k), m, n))
    a = matrix.to(dtype)
    if method == "auto":
        method = "randomized" if _use_randomized(m, n, k) else "exact"
    if method == "exact":
        if _use_gram(m, n) and dtype != torch.float64:  # float64 requests keep LAPACK's full precision
            return _drop_null(_gram_svd(a, k), m, n)
        U, s, Vh = torch.linalg.svd(a, full_matrices=False)
        return _drop_null(LowRank(U[:, :k], s[:k], Vh[:k].T), m, n)
    if method == "randomized":
        return _drop_null(_randomized_svd(a, k), m, n)
    raise OptionError(f"--svd must be one of auto, exact, randomized, got '{method}'")


def numerical_rank_tolerance(s_max: float, m: int, n: int, dtype: torch.dtype) -> float:
    """The standard tolerance (as numpy's matrix_rank): ``s_max * max(m, n) * eps(dtype)``."""
    return s_max * max(m, n) * torch.finfo(dtype).eps


def _drop_null(lr: LowRank, m: int, n: int) -> LowRank:
    s_max = float(lr.s[0]) if lr.rank else 0.0
    keep = int((lr.s > numerical_rank_tolerance(s_max, m, n, lr.s.dtype)).sum()) if s_max > 0 else 0
    return LowRank(lr.U[:, :keep].contiguous(), lr.s[:keep].contiguous(), lr.V[:, :keep].contiguous())


def _use_gram(m: int, n: int) -> bool:
    return max(m, n) >= GRAM_MIN_ASPECT * min(m, n) and min(m, n) <= GRAM_MAX_SIDE


def _gram_svd(a: torch.Tensor, k: int) -> LowRank:
    """Exact top-``k`` SVD of a tall (or wide) matrix from its small Gram matrix, accumulated in float64.

    Why: LAPACK's thin SVD of a 30522 x 384 matrix holds the whole 30522 x 384 U plus its workspace (the peak of
    ``massmerge build``, issue 10) and is slower than ``A^T A`` (384 x 384, float64, read in row blocks), its
    eigendecomposition and ``U_k = A V_k / s_k``. Accumulated in float64, the squared condition number costs
    nothing at float32 precision for the directions that are kept (above the float32 numerical-rank tolerance,
    ``s / s_max > 3e-3`` for such a shape): the result meets design.md's 1e-4 bound against the float64 SVD
    (tests/test_lowrank.py). Float64 requests keep LAPACK's SVD, which is exact to float64 precision.
    """
    if a.shape[0] < a.shape[1]:
        wide = _gram_svd(a.T, k)
        return LowRank(wide.V, wide.s, wide.U)
    n = a.shape[1]
    gram = torch.zeros(n, n, dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[0], GRAM_BLOCK_ROWS):
        block = a[start:start + GRAM_BLOCK_ROWS].double()
        gram.addmm_(block.T, block)
    values, vectors = torch.linalg.eigh(gram)
    top = values.flip(0)[:k].clamp_min(0).sqrt()
    V = vectors.flip(1)[:, :k].contiguous()
    safe = torch.where(top > 0, top, torch.ones_like(top))
    U = a.new_empty(a.shape[0], V.shape[1])  # filled a block at a time: no float64 copy of all of U (issue 10)
    for start in range(0, a.shape[0], GRAM_BLOCK_ROWS):
        U[start:start + GRAM_BLOCK_ROWS] = (a[start:start + GRAM_BLOCK_ROWS].double() @ V) / safe
    return LowRank(U, top.to(a.dtype), V.to(a.dtype))


def _randomized_svd(a: torch.Tensor, k: int) -> LowRank:
    """Halko et al. randomized SVD with a fixed seed (deterministic), via torch.svd_lowrank."""
    q = min(k + RANDOMIZED_OVERSAMPLE, *a.shape)
    devices = [a.device] if a.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the caller's random streams are left as they were
        torch.manual_seed(0)
        U, s, V = torch.svd_lowrank(a, q=q, niter=RANDOMIZED_POWER_ITERS)
    return LowRank(U[:, :k].contiguous(), s[:k].contiguous(), V[:, :k].contiguous())


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor ``P Q^T`` of ``a = P Sigma Q^T`` (closest matrix with orthonormal columns)."""
    P, _, Qh = torch.linalg.svd(a, full_matrices=False)
    return P @ Qh
