"""Pieces shared by the static merges: applying alpha, casting back, sums and means of deltas, TSV-M of factors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from massmerge.errors import OptionError
from massmerge.lowrank import LowRank, polar
from massmerge.task_vectors import add_delta, work_dtype

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
    base: Mapping[str, torch.Tensor], merged_delta: StateDict, alpha: float
) -> StateDict:
    """``base + alpha * merged_delta`` over every base key (:func:`~massmerge.task_vectors.add_delta`), cast to
    the base dtype; the merged deltas are the method's own, so their memory is reused for the result.

    Keys without a delta (integer buffers, filtered-out keys) are copied from the base unchanged.
    """
    out: StateDict = {}
    for key in base:
        tensor = base[key]
        out[key] = add_delta(tensor, merged_delta[key], alpha, inplace=True) if key in merged_delta \
            else tensor.clone()
    return out


def sum_delta(task_vectors: TaskVectors, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum of the tasks' deltas for one key, read one expert at a time and added in task order (as the
    official Task Arithmetic code adds them, so the result rounds the same). Deltas after the first are read
    into one reused buffer."""
    total: torch.Tensor | None = None
    scratch: torch.Tensor | None = None
    for tv in task_vectors:
        if total is None:
            delta = tv[key]  # a fresh tensor (CheckedTaskVector), ours to accumulate into
            total = delta.to(work_dtype(delta, dtype))
            continue
        scratch = read_delta(tv, key, out=scratch)
        total += scratch.to(total.dtype)
    assert total is not None  # check_task_vectors refuses an empty list
    return total


def read_delta(task_vector: Mapping[str, torch.Tensor], key: str, *, out: torch.Tensor | None = None,
               rows: slice | None = None) -> torch.Tensor:
    """``task_vector[key]`` (rows ``rows`` of it), into ``out`` where the mapping can (CheckedTaskVector.read)."""
    read = getattr(task_vector, "read", None)
    if callable(read):
        return read(key, rows, out=out)
    value = task_vector[key]
    return value if rows is None else value[rows]


def mean_delta(task_vectors: TaskVectors, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean of the tasks' deltas for one key, read one expert at a time."""
    return sum_delta(task_vectors, key, dtype).div_(len(task_vectors))


class KeyDeltas(Sequence[torch.Tensor]):
    """The T deltas of one key as a lazy sequence: each item is read (and checked) when indexed.

    Why: Iso-CTS walks a key's deltas twice (their sum, then each residual); a list would hold T dense
    matrices at once, this holds one.
    """

    def __init__(self, task_vectors: TaskVectors, key: str, dtype: torch.dtype | None = None) -> None:
        self._tvs, self._key, self._dtype = task_vectors, key, dtype

    def __getitem__(self, index):  # noqa: ANN001, ANN204 - Sequence protocol (int or slice)
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        delta = self._tvs[index][self._key]
        return delta.to(work_dtype(delta, self._dtype))

    def __len__(self) -> int:
        return len(self._tvs)


def tsv_merge_factors(factors: Sequence[LowRank]) -> torch.Tensor:
    """TSV-M of per-task factors: ``polar([U_t]) diag([s_t]) polar([V_t])^T``.

    For one task this is exactly its rank-k reconstruction (the polar factor of an orthonormal U is U).
    """
    if not factors:
        raise ValueError("tsv_merge_factors needs at least one task's factors")
    (m, n), dtype, device = factors[0].shape, factors[0].s.dtype, factors[0].s.device
    factors = [f for f in factors if f.rank > 0]
    if not factors:  # every task left this matrix unchanged
        return torch.zeros(m, n, dtype=dtype, device=device)
    U = torch.cat([f.U for f in factors], dim=1)
    s = torch.cat([f.s for f in factors])
    V = torch.cat([f.V for f in factors], dim=1)
    return (polar(U) * s) @ polar(V).T


def check_alpha(alpha: float) -> float:
    """alpha must be a finite number; negative values are allowed (they are a user's explicit choice)."""
    if not isinstance(alpha, (int, float)) or alpha != alpha or abs(alpha) == float("inf"):
        raise OptionError(f"--alpha must be a finite number, got {alpha}")
    return float(alpha)
