"""TSV-M of any task set from the stored per-task factors, with no SVD at serve time.

TSV-M of a set S merges one matrix as ``polar(U_S) diag(s_S) polar(V_S)^T`` where ``U_S = [U_t]_{t in S}``
(design.md section 2.3). For a matrix A with full column rank, ``polar(A) = A (A^T A)^{-1/2}``; so with the Gram
matrices ``G_U = U_S^T U_S`` and ``G_V = V_S^T V_S`` (K x K, K = sum of the set's ranks, at most a few hundred)

    delta_S = U_S  C_S  V_S^T,      C_S = G_U^{-1/2} diag(s_S) G_V^{-1/2}

and a forward never needs polar(U_S) itself: the side branch ``x delta_S^T = ((x V_S) C_S^T) U_S^T`` uses the
stored factors and the small core C_S. Each core costs one float64 Gram product per side (``m K^2``) and one
small symmetric eigendecomposition, batched over the matrices of equal K: no SVD of an ``m x K`` matrix per set,
which is what made every new task set cost seconds before (issue 13). Cores are cached per set (they are tiny).

Accuracy: the Gram product and the eigendecomposition run in float64 from the float32 factors, so the core
agrees with the exact SVD route to ~1e-12 on well-conditioned stacks (tests check 1e-6 against float64 SVD
polar factors). Eigenvalues below ``lambda_max (K eps32)^2`` (directions two tasks share exactly, where A loses
column rank) are dropped: the result is the polar factor on A's range, a partial isometry; the SVD route would
add an arbitrary orthonormal completion there instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from massmerge.device import float64_device
from massmerge.lowrank import LowRank
from massmerge.mass.budget import tensor_bytes
from massmerge.mass.experts import ExpertFactors
from massmerge.mass.lru import LRU

CORE_CACHE_SETS = 512  # cores are K x K per matrix: 512 sets of MiniLM (K <= 144) take < 100 MiB
#: Bytes of cached cores (and of cached set merges, :mod:`massmerge.mass.shared`, which share the cores' tensors), as
#: a multiple of the factors' own bytes, at least :data:`MIN_SET_CACHE_BYTES`. Why bounded: a set's cores take
#: sum K^2 over the matrices: ~3 MiB for MiniLM but 8-69 MiB for a 1-3-task set of flan-t5-base, and the count
#: bound alone allowed 15-37 GiB. Why this much: a miss recomputes the cores (0.7-5.2 s for a flan-t5-base set on
#: 2 cores), and a cyclic stream of more sets than fit misses every time under LRU; at 0.5x, 128 prompts of 61
#: distinct 1-3-task sets (bench/generate_cost.py --grouped) recomputed ~15 sets per batch of 16 and ran for over
#: half an hour where they had taken minutes; 2x holds those 61 sets. Serving memory <= base + factors x (1 +
#: this) + one set's dense weights + activations.
SET_CACHE_FACTORS = 2.0
MIN_SET_CACHE_BYTES = 256 * 2**20
TaskSet = tuple[int, ...]


@dataclass(frozen=True)
class Stacked:
    """One matrix's factors of every task side by side (rows of ``Ut``/``Vt``): task t owns rows
    ``offsets[t]:offsets[t + 1]``. Row-major transposes, so a set's factors are one row gather."""

    Ut: torch.Tensor  # [sum k_t, m]
    s: torch.Tensor  # [sum k_t]
    Vt: torch.Tensor  # [sum k_t, n]
    offsets: tuple[int, ...]

    @classmethod
    def of(cls, per_task: Sequence[LowRank]) -> Stacked:
        offsets = [0]
        for factor in per_task:
            offsets.append(offsets[-1] + factor.rank)
        Ut = torch.cat([f.U.T for f in per_task]).contiguous()
        Vt = torch.cat([f.V.T for f in per_task]).contiguous()
        return cls(Ut, torch.cat([f.s for f in per_task]).contiguous(), Vt, tuple(offsets))

    def rows(self, tasks: Iterable[int]) -> torch.Tensor:
        """Row indices of the tasks' factors, in task order."""
        device = self.Ut.device
        spans = [torch.arange(self.offsets[t], self.offsets[t + 1], device=device) for t in tasks]
        return torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long, device=device)

    def spans(self, tasks: Iterable[int]) -> tuple[tuple[int, int], ...]:
        """The tasks' rows as ``(start, stop)`` ranges, adjacent tasks joined: the same rows as :meth:`rows`, in
        order, read as views instead of gathered (why: a gather copies the factors, which costs as much memory
        traffic as the side branch that reads them)."""
        out: list[tuple[int, int]] = []
        for t in tasks:
            start, stop = self.offsets[t], self.offsets[t + 1]
            if stop == start:
                continue
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], stop)
            else:
                out.append((start, stop))
        return tuple(out)

    def views(self) -> list[LowRank]:
        """Per-task factors as views into the stacked tensors (no copy)."""
        return [LowRank(self.Ut[a:b].T, self.s[a:b], self.Vt[a:b].T) for a, b in zip(self.offsets, self.offsets[1:])]


def inverse_sqrt(gram: torch.Tensor) -> torch.Tensor:
    """``G^{-1/2}`` of symmetric PSD matrices ``[..., K, K]`` (float64), null directions dropped (see module doc)."""
    values, vectors = torch.linalg.eigh(gram)
    size = gram.shape[-1]
    floor = values[..., -1:].clamp_min(0) * (size * torch.finfo(torch.float32).eps) ** 2
    scale = torch.where(values > floor, values.clamp_min(torch.finfo(gram.dtype).tiny).rsqrt(),
                        torch.zeros_like(values))
    return (vectors * scale[..., None, :]) @ vectors.transpose(-1, -2)


def cores_of(U_rows: Sequence[torch.Tensor], s: Sequence[torch.Tensor], V_rows: Sequence[torch.Tensor]
             ) -> list[torch.Tensor]:
    """TSV-M cores ``G_U^{-1/2} diag(s) G_V^{-1/2}`` for matrices of one K, eigendecompositions batched.

    ``U_rows[i]``: a set's stacked ``U^T`` rows [K, m_i] of matrix i; returns [K, K] per matrix in the
    factors' dtype, on their device. The work is float64 and must stay so (a float32 Gram matrix squares the
    condition number past the design's 1e-4): the Gram products (``m K^2``, the large part) run on the factors'
    device (the CPU for a backend without float64, MPS), the small ``K x K`` eigendecompositions on the CPU,
    where LAPACK is fastest for matrices this size.
    """
    device, dtype = U_rows[0].device, U_rows[0].dtype
    work = float64_device(device)
    gu = torch.stack([_gram(rows, work) for rows in U_rows]).cpu()
    gv = torch.stack([_gram(rows, work) for rows in V_rows]).cpu()
    cores = inverse_sqrt(gu) * torch.stack([v.cpu() for v in s]).double()[:, None, :] @ inverse_sqrt(gv)
    return list(cores.to(device=device, dtype=dtype))


def _gram(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    rows = rows.to(device=device, dtype=torch.float64)
    return rows @ rows.T


def set_cache_bytes(factors: ExpertFactors) -> int:
    """The byte bound of the per-set caches (:data:`SET_CACHE_FACTORS`)."""
    stored = tensor_bytes(t for per_task in factors.matrices.values() for f in per_task for t in (f.U, f.s, f.V))
    return max(MIN_SET_CACHE_BYTES, int(SET_CACHE_FACTORS * stored))


def cores_bytes(cores: Mapping[str, torch.Tensor]) -> int:
    """A core cache entry's weight: its cores' bytes."""
    return tensor_bytes(cores.values())


class SetMerger:
    """Per-matrix stacked factors of every task and the TSV-M cores of task sets, cached per set.

    Thread-safe: the core cache is an :class:`~massmerge.mass.lru.LRU`; everything else is read-only after
    construction.
    """

    def __init__(self, factors: ExpertFactors) -> None:
        self.factors = factors
        # the per-task factors become views of the stacked tensors, so they are stored once; matrix by matrix,
        # so that stacking holds at most one matrix's factors twice (all at once was build's peak memory)
        self.stacked: dict[str, Stacked] = {}
        for key in list(factors.matrices):
            self.stacked[key] = Stacked.of(factors.matrices[key])
            factors.matrices[key] = self.stacked[key].views()
        self.cache_bytes = set_cache_bytes(factors)
        self._cores: LRU[TaskSet, dict[str, torch.Tensor]] = LRU(CORE_CACHE_SETS, max_bytes=self.cache_bytes,
                                                                 weigh=cores_bytes)

    def cores(self, tasks: TaskSet) -> dict[str, torch.Tensor]:
        """Matrix key -> core [K, K] of ``TSV-M(tasks)`` (tasks in increasing order), cached (LRU)."""
        return self._cores.get_or_make(tasks, lambda: self.compute_cores(tasks))

    def first_pass_tasks(self, key: str) -> TaskSet:
        """The tasks one matrix merges in the first pass: its de-redundant ``accepted`` set (all when off)."""
        accepted = self.factors.accepted.get(key)
        return tuple(accepted) if accepted else tuple(range(self.factors.num_tasks))

    def compute_cores(self, tasks: TaskSet, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Cores of ``TSV-M(tasks)`` for ``keys`` (default every matrix), not cached; the eigendecompositions of
        the matrices with equal K are batched."""
        stacked = self.stacked if keys is None else {key: self.stacked[key] for key in keys}
        by_size: dict[int, list[tuple[str, torch.Tensor]]] = {}
        for key, st in stacked.items():
            rows = st.rows(tasks)
            by_size.setdefault(int(rows.numel()), []).append((key, rows))
        out: dict[str, torch.Tensor] = {}
        for size, items in by_size.items():
            if size == 0:  # no task changed these matrices: an empty (rank-0) delta
                out.update({key: stacked[key].Ut.new_zeros(0, 0) for key, _ in items})
                continue
            sts = [stacked[key] for key, _ in items]
            cores = cores_of([st.Ut[rows] for st, (_, rows) in zip(sts, items)],
                             [st.s[rows] for st, (_, rows) in zip(sts, items)],
                             [st.Vt[rows] for st, (_, rows) in zip(sts, items)])
            out.update({key: core for (key, _), core in zip(items, cores)})
        return out

    def dense_delta(self, key: str, tasks: TaskSet, core: torch.Tensor | None = None) -> torch.Tensor:
        """``U_S C_S V_S^T`` [m, n]: the merged delta of one matrix, formed densely."""
        st = self.stacked[key]
        rows = st.rows(tasks)
        core = self.cores(tasks)[key] if core is None else core
        if rows.numel() == 0:
            return st.Ut.new_zeros(st.Ut.shape[1], st.Vt.shape[1])
        return (st.Ut[rows].T @ core) @ st.Vt[rows]


__all__ = ["SET_CACHE_FACTORS", "SetMerger", "Stacked", "cores_of", "inverse_sqrt", "set_cache_bytes",
           "cores_bytes"]
