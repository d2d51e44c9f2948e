"""Fit MASS factors into a storage budget by cutting every task's rank by one common fraction.

Why: with design.md's rank ``k = floor(min(m, n) / T)`` per task, the factors of a square matrix take
``T k (m + n + 1) ~ 2 m n`` numbers, so an artifact stored in the base's own dtype is about 2.3-2.6x the base,
not the "about 2x" users are promised (measured: ``bench/artifact_size.py``). Cutting each task to its top
``k' <= k`` singular directions is the best rank-``k'`` approximation of its delta (Eckart-Young), and since the
factors are sorted it is an exact slice, not a new SVD. One common fraction keeps the tasks' relative ranks as
the design sets them; every task keeps at least one direction per matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from massmerge.errors import OptionError
from massmerge.lowrank import LowRank
from massmerge.mass.config import size_budget
from massmerge.mass.experts import ExpertFactors
from massmerge.mass.storage import round_factors


@dataclass(frozen=True)
class BudgetFit:
    """The factors after the cut, the fraction of each rank kept and the resulting size in base sizes."""

    factors: ExpertFactors
    rank_scale: float
    size_factor: float


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def scaled_rank(rank: int, scale: float) -> int:
    """``floor(rank * scale)``, at least 1 (and 0 only for a rank-0 factor)."""
    return 0 if rank == 0 else min(rank, max(1, math.floor(rank * scale + 1e-9)))


def factor_bytes(factors: ExpertFactors, store: torch.dtype, scale: float = 1.0) -> int:
    """Bytes of the saved factors at ``scale`` of every rank: U and V in ``store``, s in float32 or wider."""
    item = _itemsize(store)
    s_item = _itemsize(torch.promote_types(store, torch.float32))
    total = 0
    for per_task in factors.matrices.values():
        for factor in per_task:
            m, n = factor.shape
            total += scaled_rank(factor.rank, scale) * ((m + n) * item + s_item)
    return total


def non_matrix_bytes(factors: ExpertFactors, store: torch.dtype) -> int:
    """Bytes of the saved non-matrix deltas (one per task and key, in ``store``)."""
    return sum(t.numel() for per_task in factors.non_matrix.values() for t in per_task) * _itemsize(store)


def truncate(factors: ExpertFactors, scale: float) -> ExpertFactors:
    """Every task's factors cut to its top ``scaled_rank(k, scale)`` directions.

    ``rank_fraction`` still names the design rank the cut started from; de-redundancy is kept as computed.
    """
    matrices = {key: [_slice(f, scaled_rank(f.rank, scale)) for f in per_task]
                for key, per_task in factors.matrices.items()}
    return ExpertFactors(task_names=list(factors.task_names), rank_fraction=factors.rank_fraction,
                         matrices=matrices, non_matrix=dict(factors.non_matrix), accepted=dict(factors.accepted),
                         eps=factors.eps)


def _slice(factor: LowRank, rank: int) -> LowRank:
    return LowRank(factor.U[:, :rank].contiguous(), factor.s[:rank].contiguous(), factor.V[:, :rank].contiguous())


def fit_to_size(factors: ExpertFactors, *, base_bytes: int, max_size: float, store: torch.dtype,
                extra_bytes: int = 0) -> BudgetFit:
    """The largest common rank scale whose artifact (base + factors + non-matrix deltas + ``extra_bytes``, e.g.
    heads and the files' header bytes) is at most ``max_size`` times ``base_bytes``; the factors unchanged when
    they already fit.

    Raises :class:`OptionError` naming ``--max-size`` when even one direction per task does not fit.
    """
    if not max_size > 1.0:
        raise OptionError(f"--max-size: must be > 1 (a multiple of the base's size), got {max_size}")
    fixed = base_bytes + non_matrix_bytes(factors, store) + extra_bytes
    budget = max_size * base_bytes - fixed

    def size(scale: float) -> float:
        return (fixed + factor_bytes(factors, store, scale)) / base_bytes

    if factor_bytes(factors, store) <= budget:
        return BudgetFit(factors, 1.0, size(1.0))
    if factor_bytes(factors, store, 0.0) > budget:
        raise OptionError(f"--max-size: {max_size}x the base cannot hold one direction per task and matrix "
                          f"(the base, non-matrix deltas and extras alone are {fixed / base_bytes:.2f}x); raise it or use "
                          "--factor-dtype float16")
    low, high = 0.0, 1.0  # factor_bytes is monotone in the scale: bisect for the largest scale that fits
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if factor_bytes(factors, store, mid) <= budget else (low, mid)
    return BudgetFit(truncate(factors, low), low, size(low))


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors' elements (what a tensor file stores besides its header)."""
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class StoredFactors:
    """Factors exactly as ``massmerge build`` saves them, the rank scale kept, the storage dtype and the
    resulting artifact size in base sizes (``note`` says why design ranks were kept above the budget)."""

    factors: ExpertFactors
    rank_scale: float
    store: torch.dtype
    size_factor: float
    note: str | None = None


def stored_factors(factors: ExpertFactors, heads: Sequence[torch.nn.Module], base_bytes: int, store: torch.dtype,
                   max_size: float | None, *, header_bytes: int) -> StoredFactors:
    """Cut to ``max_size`` (None: the default budget, best effort; 0: design ranks), then rounded to the
    storage dtype and back, so what is evaluated or served in memory is exactly what a saved artifact holds.

    The one path from built factors to stored ones: ``massmerge build`` and ``massmerge suite`` both use it.
    ``header_bytes``: what the artifact's file headers add for these factors (the artifact layer knows its format:
    :func:`massmerge.artifact.manifest.factor_header_bytes`).
    An explicit budget that cannot be met is an error; the default one keeps the design ranks with a note.
    The base's tokenizer and config files are left out of both sides of the ratio: on disk they count in the
    base's files too, and ``(B + E) / B >= (B + S + E) / (B + S)``, so leaving them out keeps the fit on the safe
    side (tests/artifact/test_artifact.py::test_cli_build_size_budget_holds_on_disk).
    ``factors`` is consumed: rounded in place, or emptied when a cut copied what it keeps (why: two full sets
    of factors at once were the peak memory of ``massmerge build``).
    """
    extra = header_bytes + tensor_bytes(p for h in heads for p in h.state_dict().values())
    fit, note = BudgetFit(factors, 1.0, 0.0), None
    if max_size != 0:
        try:
            fit = fit_to_size(factors, base_bytes=base_bytes, max_size=size_budget(max_size), store=store,
                              extra_bytes=extra)
        except OptionError as exc:
            if max_size is not None:
                raise
            note = f"design ranks kept; {exc}".replace("; raise it or use --factor-dtype float16", "")
    size = (base_bytes + non_matrix_bytes(fit.factors, store) + extra + factor_bytes(fit.factors, store)) / base_bytes
    if fit.factors is not factors:  # a cut: the design-rank factors are no longer needed
        factors.matrices.clear()
    return StoredFactors(round_factors(fit.factors, store, in_place=True), fit.rank_scale, store, size, note)


__all__ = ["BudgetFit", "StoredFactors", "factor_bytes", "fit_to_size", "non_matrix_bytes", "scaled_rank",
           "stored_factors", "tensor_bytes", "truncate"]
