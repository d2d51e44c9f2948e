"""TIES-Merging (Yadav et al.), following the official code.

Per task, keep the entries whose magnitude is in the top ``density`` fraction of the task's WHOLE flattened
task vector (all keys together); elect each entry's sign as the sign of the sum of the trimmed values (where
that sum is exactly 0, the majority sign: the sign of the sum of all elected signs); average the trimmed
values that agree with the elected sign; return ``theta_0 + alpha * merged``.

How it stays cheap: the official code stacks all T flattened task vectors ([T, d], T checkpoints in memory).
Here each task's threshold comes from one reused buffer of its magnitudes (an in-place selection, no sort and
no index array), and the merge is one pass over each key in row blocks that keeps, per entry, the running sum
of the trimmed values and the sums and counts of the positive and of the negative ones. Both candidate
means come from those; the elected sign picks one. The sums run in task order, as the official column sums do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from massmerge.errors import OptionError
from massmerge.merging.common import (
    StateDict,
    TaskVectors,
    check_alpha,
    check_task_vectors,
    finalize,
    read_delta,
)
from massmerge.merging.names import DEFAULT_ALPHA, TIES_DENSITY
from massmerge.progress import track
from massmerge.task_vectors import work_dtype

BLOCK_ELEMENTS = 1 << 15  # entries per row block of the merge pass: its temporaries stay in cache and on the heap


def magnitude_threshold(
    task_vector: Mapping[str, torch.Tensor], keys: Sequence[str], density: float, buffer: torch.Tensor | None = None
) -> float:
    """The smallest magnitude kept for this task: the official ``kthvalue(d - int(d * density))`` of |tv|.

    ``buffer`` (one float per entry of the task vector) is reused across tasks when given.
    """
    flat = magnitudes(task_vector, keys, buffer)
    numel = flat.numel()
    kth = numel - int(numel * density)
    if kth <= 0:
        return 0.0
    return kth_smallest(flat, kth)


def magnitudes(task_vector: Mapping[str, torch.Tensor], keys: Sequence[str],
               buffer: torch.Tensor | None = None) -> torch.Tensor:
    """|tv| of every key, flattened in key order into ``buffer`` (allocated when None)."""
    if buffer is None:
        buffer = torch.empty(sum(_numel(task_vector, k) for k in keys), dtype=_flat_dtype(task_vector, keys),
                             device=_device_of(task_vector))
    position = 0
    for key in keys:
        shape = _shape_of(task_vector, key)
        size = int(torch.Size(shape).numel())
        target = buffer[position:position + size]
        delta = read_delta(task_vector, key, out=target.view(shape))  # read straight into the buffer
        if delta.data_ptr() != target.data_ptr():
            target.copy_(delta.reshape(-1))
        target.abs_()
        position += size
    return buffer[:position]


def kth_smallest(values: torch.Tensor, kth: int) -> float:
    """The ``kth`` smallest value (1-based, as ``torch.kthvalue``), selected in place: ``values`` is reordered.

    Why not ``kthvalue``: it copies the values and builds an int64 index array (3x the input's memory).
    """
    if values.device.type != "cpu":  # on a GPU, memory is not the bound: torch's own selection
        return float(values.kthvalue(kth).values)
    array = values.numpy()
    array.partition(kth - 1)
    return float(array[kth - 1])


def _numel(task_vector: Mapping[str, torch.Tensor], key: str) -> int:
    return int(torch.Size(_shape_of(task_vector, key)).numel())


def _shape_of(task_vector: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """A key's shape, asked of a CheckedTaskVector without a read."""
    known = getattr(task_vector, "shape", None)
    return tuple(known(key)) if callable(known) else tuple(task_vector[key].shape)


def _device_of(task_vector: Mapping[str, torch.Tensor]) -> torch.device | None:
    """Where a task vector's deltas are computed (``CheckedTaskVector.on``), else the CPU."""
    return getattr(task_vector, "device", None)


def _flat_dtype(task_vector: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.dtype:
    """The dtype the task's magnitudes are compared in (asked of a CheckedTaskVector without a read)."""
    if not keys:
        return torch.float32
    known = getattr(task_vector, "work_dtype", None)
    return known(keys[0]) if callable(known) else work_dtype(task_vector[keys[0]])


@dataclass
class _Votes:
    """Running per-entry tallies of one block of one key over the tasks seen so far."""

    total: torch.Tensor  # sum of the trimmed values: its sign is the elected sign
    positive: torch.Tensor  # sum of the positive trimmed values
    negative: torch.Tensor  # sum of the negative trimmed values
    n_positive: torch.Tensor
    n_negative: torch.Tensor

    @classmethod
    def first(cls, trimmed: torch.Tensor) -> "_Votes":
        """Tallies of the first task (``trimmed`` becomes the running sum)."""
        return cls(trimmed, trimmed.clamp(min=0), trimmed.clamp(max=0), (trimmed > 0).to(trimmed.dtype),
                   (trimmed < 0).to(trimmed.dtype))

    def add(self, trimmed: torch.Tensor) -> None:
        self.total += trimmed
        self.positive += trimmed.clamp(min=0)
        self.negative += trimmed.clamp(max=0)
        self.n_positive += trimmed > 0
        self.n_negative += trimmed < 0


@dataclass
class _Merged:
    """One key's disjoint mean with the sign elected where the sum is nonzero, and the entries whose sum is
    exactly zero but whose positive mean is not (they follow the majority sign, known only after all keys)."""

    value: torch.Tensor
    sign_sum: float = 0.0
    zero_index: list[torch.Tensor] = field(default_factory=list)
    zero_positive: list[torch.Tensor] = field(default_factory=list)


def _trim(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """The official ``M * (|M| >= kth)``: entries below the task's threshold set to zero, in place.

    ``hardshrink(x, l)`` zeroes ``|x| <= l``; with ``l`` the float just below the threshold (in the delta's
    dtype, which the threshold is a value of) that is exactly ``|x| < threshold``, at a sixteenth of the cost of
    ``masked_fill_(x.abs() < threshold, 0)``.
    """
    if threshold <= 0.0:  # every magnitude is >= 0: nothing is trimmed
        return delta
    below = float(torch.nextafter(torch.tensor(threshold, dtype=delta.dtype), torch.tensor(0.0, dtype=delta.dtype)))
    return torch.hardshrink(delta, below, out=delta)


def _merge_key(task_vectors: TaskVectors, key: str, thresholds: Sequence[float], shape: tuple[int, ...]) -> _Merged:
    """One key's merged delta, computed in row blocks of at most BLOCK_ELEMENTS entries."""
    rows = shape[0] if shape else 1
    row_size = max(1, int(torch.Size(shape[1:]).numel())) if shape else 1
    step = max(1, BLOCK_ELEMENTS // row_size)
    merged: _Merged | None = None
    for start in range(0, rows, step):
        block = slice(start, min(rows, start + step)) if shape and step < rows else None
        votes: _Votes | None = None
        scratch: torch.Tensor | None = None
        for tv, threshold in zip(task_vectors, thresholds):
            if votes is None:
                votes = _Votes.first(_trim(_owned(read_delta(tv, key, rows=block), tv), threshold))
            else:
                scratch = _trim(_owned(read_delta(tv, key, rows=block, out=scratch), tv), threshold)
                votes.add(scratch.to(votes.total.dtype))
        assert votes is not None
        if merged is None:
            merged = _Merged(votes.total.new_empty(shape))
        _finish_block(votes, merged, block, row_size)
    assert merged is not None
    return merged


def _finish_block(votes: _Votes, merged: _Merged, block: slice | None, row_size: int) -> None:
    """Elect the block's signs, write its disjoint means, and note its undecided (zero-sum) entries."""
    sign = torch.sign(votes.total)
    merged.sign_sum += float(sign.sum())
    mean_pos = votes.positive / votes.n_positive.clamp(min=1)
    mean_neg = votes.negative / votes.n_negative.clamp(min=1)
    out = merged.value if block is None else merged.value[block]
    torch.where(sign > 0, mean_pos, mean_neg, out=out)  # a zero sum takes the non-positive branch for now
    undecided = (sign == 0) & (mean_pos != 0)
    if bool(undecided.any()):
        offset = 0 if block is None else block.start * row_size
        index = undecided.reshape(-1).nonzero().reshape(-1)
        merged.zero_index.append(index + offset)
        merged.zero_positive.append(mean_pos.reshape(-1)[index])


def _owned(delta: torch.Tensor, task_vector: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``delta`` if it is ours to change (a CheckedTaskVector read), else a copy."""
    return delta if callable(getattr(task_vector, "read", None)) else delta.clone()


def merge(
    base: Mapping[str, torch.Tensor],
    task_vectors: TaskVectors,
    *,
    alpha: float = DEFAULT_ALPHA,
    density: float = TIES_DENSITY,
) -> StateDict:
    """TIES over every key; ``density`` is the kept fraction per task (``--ties-density``)."""
    keys = check_task_vectors(task_vectors)
    alpha = check_alpha(alpha)
    if not 0.0 < density <= 1.0:
        raise OptionError(f"--ties-density must be in (0, 1], got {density}")
    buffer = torch.empty(sum(int(base[k].numel()) for k in keys), dtype=_flat_dtype(task_vectors[0], keys),
                         device=next(iter(base.values())).device)
    thresholds = [magnitude_threshold(tv, keys, density, buffer) for tv in track(task_vectors, "ties: trim")]
    del buffer
    results = {key: _merge_key(task_vectors, key, thresholds, tuple(base[key].shape))
               for key in track(keys, "ties: merge")}
    sign_total = sum(result.sign_sum for result in results.values())
    majority = (sign_total > 0) - (sign_total < 0)  # official: sign of the sum, 0 stays 0
    merged: StateDict = {}
    for key, result in results.items():
        if majority > 0:  # zero-sum entries take the positive branch under a positive majority
            flat = result.value.view(-1)
            for index, value in zip(result.zero_index, result.zero_positive):
                flat[index] = value
        merged[key] = result.value
    return finalize(base, merged, alpha)
