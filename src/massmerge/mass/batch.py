"""The batch axis, owned in one place: how many samples a batch holds, taking some of them, which task set each
row runs under, and where a sample's real tokens are.

Row identity is carried per row, as PEFT's mixed-adapter batches carry it (``adapter_names``): a
:class:`RowSets` holds one set id per sample (``ids``, a ``LongTensor[B]``). A module that sees ``N = B * n``
rows (beam search or ``num_return_sequences``, which HF lays out with ``repeat_interleave``) maps row ``r`` to
set ``ids[r // n]``; a module that sees ``B`` rows (an encoder) maps row ``r`` to ``ids[r]``; an input with one
row broadcasts over the rows last seen (BERT's ``position_ids [1, L]``). Kernels work on contiguous spans of rows
of one set: :meth:`RowSets.layout` gives, per row count, the permutation that makes them contiguous (none when
the rows already are, as the engine lays them out: :class:`Plan`) and the spans.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from massmerge.errors import OptionError
from massmerge.mass.setmerge import TaskSet


class Unbatchable(Exception):
    """This model cannot run a batch of several task sets in one forward; run one forward per set."""


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch: a tensor's first dim, or that of its first tensor value."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return int(value.shape[0])
    raise OptionError("batch: holds no tensor, cannot tell its size")


def index_batch(batch: Any, index: torch.Tensor) -> Any:
    """The samples ``index`` of a tensor batch or of every per-sample tensor in a dict batch."""
    if isinstance(batch, torch.Tensor):
        return batch[index]
    size = batch_size_of(batch)
    return {key: value[index] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == size else value
            for key, value in batch.items()}


def group_by_task_set(selected: torch.Tensor) -> list[tuple[TaskSet, torch.Tensor]]:
    """Sample indices grouped by their selected task set (sets in sorted order)."""
    groups: dict[TaskSet, list[int]] = {}
    for row, mask in enumerate(selected.tolist()):
        groups.setdefault(tuple(i for i, on in enumerate(mask) if on), []).append(row)
    return [(tasks, torch.tensor(rows, dtype=torch.long, device=selected.device))
            for tasks, rows in sorted(groups.items())]


def set_order(selected: torch.Tensor) -> torch.Tensor:
    """Sample indices ordered so that samples with the same selected task set are adjacent (sets in sorted
    order, samples in their order within a set). Why: a decode step reads every distinct set's factors and core
    of a batch, so batches cut from this order hold few sets (docs/BENCHMARKS.md, routed generation)."""
    return torch.cat([rows for _, rows in group_by_task_set(selected)])


def attention_mask_of(batch: Any, shape: Sequence[int] | None = None) -> torch.Tensor | None:
    """The batch's ``attention_mask`` as bool (only when it has ``shape``, if given), else None."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, torch.Tensor) or (shape is not None and tuple(mask.shape) != tuple(shape)):
        return None
    return mask.bool()


def batch_tokens(batch: Any, rows: Sequence[torch.Tensor]) -> int:
    """Positions per sample of a batch: its mask's width, else the samples' own length."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return int(mask.shape[1]) if isinstance(mask, torch.Tensor) and mask.ndim == 2 else int(rows[0].shape[0])


@dataclass(frozen=True)
class Plan:
    """The engine's order of a mixed batch: each task set's samples contiguous, largest group first (so the groups
    that take a dense weight form a prefix), then by set size (so equal ranks are adjacent: one bmm)."""

    order: torch.Tensor  # order[i] = original index of ordered row i
    spans: list[tuple[TaskSet, int, int]]

    @classmethod
    def of(cls, groups: Sequence[tuple[TaskSet, torch.Tensor]]) -> Plan:
        ordered = sorted(groups, key=lambda group: (-len(group[1]), len(group[0])))
        spans, start = [], 0
        for tasks, index in ordered:
            spans.append((tasks, start, start + len(index)))
            start += len(index)
        return cls(torch.cat([index for _, index in ordered]), spans)

    def row_ids(self) -> torch.Tensor:
        """The ordered batch's set id per row (set i = ``spans[i]``), non-decreasing."""
        sizes = torch.tensor([stop - start for _, start, stop in self.spans], device=self.order.device)
        return torch.arange(len(self.spans), device=self.order.device).repeat_interleave(sizes)

    def unpermute(self, ordered: torch.Tensor) -> torch.Tensor:
        """Rows of an ordered-batch output put back in the original sample order."""
        out = torch.empty_like(ordered)
        out[self.order] = ordered
        return out


@dataclass(frozen=True)
class Layout:
    """How ``size`` rows lie: ``ids[r]`` is row r's set; ``perm`` (None: identity) orders them so each set's rows
    are the contiguous span ``[start, stop)`` of ``spans`` (set id, start, stop)."""

    size: int
    ids: torch.Tensor
    perm: torch.Tensor | None
    inverse: torch.Tensor | None
    spans: tuple[tuple[int, int, int], ...]

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` in span order."""
        return x if self.perm is None else x.index_select(0, self.perm)

    def unsort(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of a span-ordered ``x`` back in the batch's order."""
        return x if self.inverse is None else x.index_select(0, self.inverse)

    def rows(self, start: int, stop: int) -> torch.Tensor | slice:
        """The batch rows of span rows ``[start, stop)``."""
        return slice(start, stop) if self.perm is None else self.perm[start:stop]


class RowSets:
    """Each of ``B`` rows' task set id (``ids``), with spans ordered by ``order`` (set ids, span order)."""

    def __init__(self, ids: torch.Tensor, order: Sequence[int], counts: Sequence[int] | None = None) -> None:
        """``counts`` (rows per set id), when the caller knows them, says the rows are already in span order
        (the engine's batches): no host sync and no permutation."""
        self.ids = ids
        self.size = int(ids.shape[0])
        self.order = tuple(order)
        rank = torch.empty(max(self.order) + 1, dtype=torch.long)
        rank[list(self.order)] = torch.arange(len(self.order))
        self._rank = rank.to(ids.device)
        contiguous = counts is not None
        if counts is None:
            counts = torch.bincount(ids, minlength=len(rank)).tolist()  # one host sync per batch
        self.counts = {s: counts[s] for s in self.order if counts[s]}
        if not contiguous:
            key = self._rank[ids]
            contiguous = self.size < 2 or bool((key[1:] >= key[:-1]).all())
        self.contiguous = contiguous
        self._layouts: dict[int, Layout] = {}
        self._seen = threading.local()  # the row count last seen by this thread (broadcast inputs)

    @classmethod
    def single(cls, size: int, device: torch.device | None = None) -> RowSets:
        """``size`` rows of one set (id 0)."""
        return cls(torch.zeros(size, dtype=torch.long, device=device), (0,), (size,))

    @property
    def whole(self) -> bool:
        """Every row has the same set: no module needs the batch laid out."""
        return len(self.counts) == 1

    def layout(self, size: int) -> Layout:
        """The layout of a module input of ``size`` rows (a multiple of ``B``; cached per size)."""
        found = self._layouts.get(size)
        if found is None:
            found = self._layouts[size] = self._make_layout(size)
        return found

    def _make_layout(self, size: int) -> Layout:
        n = size // self.size
        ids = self.ids if n == 1 else self.ids.repeat_interleave(n)
        perm = inverse = None
        if not self.contiguous:
            perm = torch.sort(self._rank[ids], stable=True).indices
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(size, device=perm.device)
        spans, start = [], 0
        for s in self.order:
            count = self.counts.get(s, 0) * n
            if count:
                spans.append((s, start, start + count))
                start += count
        return Layout(size, ids, perm, inverse, tuple(spans))

    def rows_of(self, x: torch.Tensor, unbatchable: type[Exception]) -> tuple[torch.Tensor, int]:
        """``(x, N)`` with the rows on dim 0: as is when ``N`` is a multiple of ``B``, expanded from a broadcast
        row to the rows last seen; anything else raises ``unbatchable`` (a module with no batch on dim 0)."""
        size = int(x.shape[0]) if x.ndim else 0
        if size == 1 and self.size > 1:
            seen = self.seen
            return x.expand(seen, *x.shape[1:]), seen
        if size == 0 or size % self.size:
            raise unbatchable(f"a routed module got input of shape {list(x.shape)}; the batch has {self.size} "
                              "rows (a module must see them, or a multiple for beams, on dim 0)")
        self._seen.rows = size
        return x, size

    @property
    def seen(self) -> int:
        """The row count the last routed module of this thread saw (``B`` before any)."""
        return getattr(self._seen, "rows", self.size)


__all__ = ["Layout", "Plan", "RowSets", "TaskSet", "Unbatchable", "attention_mask_of", "batch_size_of",
           "batch_tokens", "group_by_task_set", "index_batch", "set_order"]
