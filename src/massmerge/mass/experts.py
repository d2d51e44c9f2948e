"""Per-task factors: what a MASS model keeps of each expert, and the de-redundancy of the first pass.

Experts are reduced to their factors one at a time (the caller hands an iterator of lazily read task vectors),
so memory grows with the factors, not with T full checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from massmerge.checkpoints import all_finite
from massmerge.device import float64_device
from massmerge.errors import CheckpointError, OptionError
from massmerge.choices import SVDMethod, check_task_names
from massmerge.lowrank import LowRank, rank_for, rank_fraction_for, truncated_svd
from massmerge.mass.config import DEFAULT_EPS
from massmerge.memory import release_freed_memory
from massmerge.merging.common import tsv_merge_factors
from massmerge.progress import track
from massmerge.task_vectors import is_matrix, work_dtype

StateDict = dict[str, torch.Tensor]


def lowrank_inner(a: LowRank, b: LowRank) -> torch.Tensor:
    """Frobenius inner product of two low-rank matrices without forming them:
    ``<A, B> = sum_ij s_a[i] (U_a^T U_b)[i,j] s_b[j] (V_a^T V_b)[i,j]``."""
    return ((a.U.T @ b.U) * (a.V.T @ b.V) * torch.outer(a.s, b.s)).sum()


def lowrank_cosine(a: LowRank, b: LowRank) -> float:
    """Cosine similarity of two rank-k deltas (their Frobenius norms are ``||s||``)."""
    denom = float(torch.linalg.vector_norm(a.s) * torch.linalg.vector_norm(b.s))
    return 0.0 if denom == 0.0 else float(lowrank_inner(a, b)) / denom


def deredundant_tasks(factors: Sequence[LowRank], eps: float) -> list[int]:
    """Tasks kept for one matrix: in task order, drop a task whose cosine with an accepted one exceeds eps."""
    accepted = [0]
    for task in range(1, len(factors)):
        if all(lowrank_cosine(factors[task], factors[kept]) <= eps for kept in accepted):
            accepted.append(task)
    return accepted


def _same(a: LowRank, b: LowRank) -> bool:
    return a.rank == b.rank and all(torch.equal(x, y) for x, y in ((a.s, b.s), (a.U, b.U), (a.V, b.V)))


def indistinct_tasks(factors: ExpertFactors) -> tuple[list[str], list[tuple[str, str]]]:
    """(tasks whose every factor and delta is zero, pairs of tasks whose factors and deltas are all equal).

    Why: such experts build without error, but the router cannot tell them apart (a zero expert has no subspace
    to project on; two equal experts share one), so it answers 50/50 between them. The SVD is deterministic, so
    equal task vectors give bitwise-equal factors; a fingerprint (every singular-value sum) finds candidate
    pairs cheaply and ``torch.equal`` confirms them.
    """
    names, T = factors.task_names, factors.num_tasks
    zero = [names[t] for t in range(T)
            if all(per[t].rank == 0 or not bool(per[t].s.any()) for per in factors.matrices.values())
            and all(not bool(per[t].any()) for per in factors.non_matrix.values())]  # fmt: skip
    prints = [tuple(float(per[t].s.sum()) for per in factors.matrices.values()) for t in range(T)]
    twins = []
    for i in range(T):
        for j in range(i + 1, T):
            if names[i] in zero or names[j] in zero or prints[i] != prints[j]:
                continue
            if all(_same(per[i], per[j]) for per in factors.matrices.values()) and all(
                    torch.equal(per[i], per[j]) for per in factors.non_matrix.values()):
                twins.append((names[i], names[j]))
    return zero, twins


def indistinct_note(factors: ExpertFactors) -> str | None:
    """One line naming the experts the router cannot tell apart (:func:`indistinct_tasks`), or None."""
    zero, twins = indistinct_tasks(factors)
    parts = []
    if zero:
        parts.append(f"the task vectors of {', '.join(zero)} are all zero (those experts equal the base)")
    if twins:
        parts.append("these experts are identical: " + ", ".join(f"{a} = {b}" for a, b in twins))
    if not parts:
        return None
    return "; ".join(parts) + "; the router cannot tell them apart and will split their inputs between them"


@dataclass
class ExpertFactors:
    """Per-task rank-k factors of every matrix and the non-matrix deltas of every other key.

    ``matrices[key][t]`` is task t's :class:`LowRank` of that matrix, ``non_matrix[key][t]`` its delta, and
    ``accepted[key]`` the tasks merged in the first pass after de-redundancy (all tasks when eps is None).
    """

    task_names: list[str]
    rank_fraction: float
    matrices: dict[str, list[LowRank]] = field(default_factory=dict)
    non_matrix: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    accepted: dict[str, list[int]] = field(default_factory=dict)
    eps: float | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @classmethod
    def build(
        cls,
        task_vectors: Iterable[Mapping[str, torch.Tensor]],
        task_names: Sequence[str],
        *,
        rank_fraction: float | None = None,
        eps: float | None = DEFAULT_EPS,
        svd: SVDMethod = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "ExpertFactors":
        """Reduce each task vector to factors as it arrives (stream them one at a time), then de-duplicate.

        ``device``: where the SVDs run (each matrix's delta is moved there, factorized, and its factors come
        back to the CPU, so the device holds one matrix at a time whatever T is)."""
        names = list(task_names)
        if len(names) < 2:
            raise OptionError(f"--experts: MASS needs at least 2 experts, got {len(names)}")
        check_task_names(names)
        fraction = rank_fraction_for(len(names), rank_fraction)
        factors = cls(task_names=names, rank_fraction=fraction)
        count = 0
        for tv in track(task_vectors, "factorizing experts", total=len(names)):
            factors.add_task(tv, svd=svd, dtype=dtype, device=device)
            release_freed_memory()  # temporaries of this expert go back to the OS (massmerge/memory.py)
            count += 1
        if count != len(names):
            raise OptionError(f"--task-names: {len(names)} names for {count} experts")
        factors.apply_deredundancy(eps)
        return factors

    def add_task(self, task_vector: Mapping[str, torch.Tensor], *, svd: SVDMethod = "auto",
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Factorize one task vector (matrices -> rank-k SVD on ``device``, the rest kept as deltas) and append
        it; the factors are kept on the CPU."""
        matrices: dict[str, LowRank] = {}
        others: dict[str, torch.Tensor] = {}
        svd_device = None if device is None else float64_device(torch.device(device))
        for key in task_vector:
            delta = task_vector[key]
            if not all_finite(delta):  # CheckedTaskVector has checked it already; a plain mapping has not
                raise CheckpointError(f"task {self._label(self._count())}: key '{key}' contains NaN or Inf values")
            if is_matrix(delta):
                k = rank_for(delta.shape, self.rank_fraction)
                work = delta if svd_device is None else delta.to(svd_device, non_blocking=True)
                factor = truncated_svd(work, k, method=svd, dtype=work_dtype(delta, dtype))
                matrices[key] = factor if svd_device is None else factor.to(torch.device("cpu"))
            else:
                others[key] = delta.to(work_dtype(delta, dtype))
        self.add_task_factors(matrices, others)

    def add_task_factors(self, matrices: Mapping[str, LowRank], non_matrix: Mapping[str, torch.Tensor]) -> None:
        """Append one task's precomputed factors (e.g. from a LoRA adapter, factorized without densifying)."""
        position = self._count()
        if position and (set(matrices) != set(self.matrices) or set(non_matrix) != set(self.non_matrix)):
            raise OptionError(f"task {self._label(position)} has different keys from the first task")
        for key, value in matrices.items():
            if position and value.shape != self.matrices[key][0].shape:
                raise CheckpointError(f"task {self._label(position)}: key '{key}' has shape {list(value.shape)}, "
                                      f"the first task has {list(self.matrices[key][0].shape)}")
        for key, value in non_matrix.items():
            if position and value.shape != self.non_matrix[key][0].shape:
                raise CheckpointError(f"task {self._label(position)}: key '{key}' has shape {list(value.shape)}, "
                                      f"the first task has {list(self.non_matrix[key][0].shape)}")
        for key, value in matrices.items():
            self.matrices.setdefault(key, []).append(value)
        for key, value in non_matrix.items():
            self.non_matrix.setdefault(key, []).append(value)

    def _count(self) -> int:
        """Tasks added so far."""
        return len(next(iter(self.matrices.values()), next(iter(self.non_matrix.values()), [])))

    def _label(self, position: int) -> str:
        return repr(self.task_names[position]) if position < len(self.task_names) else f"#{position}"

    def apply_deredundancy(self, eps: float | None) -> None:
        """Fill ``accepted`` per matrix; eps None keeps every task everywhere."""
        self.eps = eps
        every = list(range(self.num_tasks))
        self.accepted = {
            key: every if eps is None else deredundant_tasks(per_task, eps) for key, per_task in self.matrices.items()
        }

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ExpertFactors:
        """Every factor and delta moved to ``device`` and cast to ``dtype`` (floating ones), in place; returns
        ``self``. Why in place: the factors are the largest thing a served model holds besides the base."""
        for per_task in self.matrices.values():
            for t, f in enumerate(per_task):
                per_task[t] = f.to(device, dtype)
        for per_task in self.non_matrix.values():
            for t, delta in enumerate(per_task):
                per_task[t] = delta.to(device=device, dtype=dtype)
        return self

    def dropped(self) -> dict[str, list[str]]:
        """Matrix key -> names of tasks left out of the first-pass merge (for the report)."""
        out = {}
        for key, kept in self.accepted.items():
            gone = [self.task_names[t] for t in range(self.num_tasks) if t not in kept]
            if gone:
                out[key] = gone
        return out

    def merged_delta(self, tasks: Sequence[int], *, first_pass: bool = False) -> StateDict:
        """TSV-M of the tasks ``tasks``: matrices by TSV-M of their factors, other keys by the mean delta.

        With ``first_pass`` each matrix merges only its de-redundant accepted tasks.
        """
        out: StateDict = {}
        for key, per_task in self.matrices.items():
            chosen = [t for t in tasks if t in self.accepted[key]] if first_pass else list(tasks)
            out[key] = tsv_merge_factors([per_task[t] for t in chosen or tasks])
        for key, per_task in self.non_matrix.items():
            out[key] = torch.stack([per_task[t] for t in tasks]).mean(dim=0)
        return out

    def routing_basis(self, weight_key: str) -> list[torch.Tensor]:
        """Each task's right singular vectors V_t [n, k] of the routing matrix (input space of the layer)."""
        if weight_key not in self.matrices:
            raise OptionError(f"--routing-layer: no task factors for '{weight_key}' (is it a filtered-out key?)")
        return [factor.V for factor in self.matrices[weight_key]]

    def numel(self) -> int:
        """Numbers stored for all tasks: k (m + n + 1) per matrix per task plus the non-matrix deltas."""
        low = sum(f.numel() for per_task in self.matrices.values() for f in per_task)
        rest = sum(t.numel() for per_task in self.non_matrix.values() for t in per_task)
        return low + rest
