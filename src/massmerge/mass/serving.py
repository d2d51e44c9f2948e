"""Serving a stream of inputs with one :class:`~massmerge.mass.MASSModel`: route a window, then run the second
pass per task set.

Why (issue 13): a batch of mixed traffic routes its samples to many task sets, so its second pass splits into
many small groups, each adding a low-rank side branch (about 0.4x of a base forward in flops, plus the cost of
many small ops). Routing a *window* of inputs first and then serving each task set's samples together gives
full single-set batches, where the model forms each merged weight once for the batch (``k m n`` flops, about
1/20 of a MiniLM forward at batch 32) and the second pass costs about one base forward: the two-pass limit.
Sets too rare to fill a batch are served together in one mixed forward (the ``batched`` strategy).

Within a window inputs are batched by size (token count), so padding is small; outputs come back in input order.
The predictions do not depend on the window: routing is per sample, and every sample runs the model merged from
its own set (strategies agree to float rounding).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from massmerge.mass.batch import group_by_task_set
from massmerge.mass.model import MASSModel

WINDOW_BATCHES = 8  # a window routes at least this many batches before the second pass ...
WINDOW_BATCHES_PER_TASK = 4  # ... and 4 per task: each set leaves at most one partial batch per window, so
# partial batches add at most about 1/4 to the second pass whatever T is (8 batches at T = 8 added ~25% CPU)
FULL_GROUP_FRACTION = 0.5  # a set with at least half a batch of samples gets batches of its own

Collate = Callable[[Sequence[Any]], Any]


@dataclass(frozen=True)
class Prediction:
    """One input's answer: its index, the chosen task and class, and how the router saw it."""

    index: int
    task: int
    label: int
    probs: torch.Tensor  # [T], on the CPU
    selected: torch.Tensor  # [T] bool, on the CPU
    features: torch.Tensor | None = None  # [d] second-pass features (when asked for)


def _chunks(rows: list[int], size: int) -> list[list[int]]:
    return [rows[start:start + size] for start in range(0, len(rows), size)]


def _by_size(rows: list[int], sizes: Sequence[int]) -> list[int]:
    return sorted(rows, key=lambda i: (sizes[i], i))


@torch.no_grad()
def serve_window(model: MASSModel, items: Sequence[Any], collate: Collate, *, batch_size: int,
                 sizes: Sequence[int] | None = None, return_features: bool = False) -> list[Prediction]:
    """Predictions for ``items`` (in order): first passes in size-sorted batches, then second passes per set."""
    sizes = sizes if sizes is not None else [0] * len(items)
    order = _by_size(list(range(len(items))), sizes)
    probs: list[torch.Tensor | None] = [None] * len(items)
    selected: list[torch.Tensor | None] = [None] * len(items)
    hidden: list[torch.Tensor | None] = [None] * len(items)  # restart_block: each input's first-pass states
    for rows in _chunks(order, batch_size):
        routing = model.route(collate([items[i] for i in rows]))
        for row, i in enumerate(rows):
            probs[i], selected[i] = routing.probs[row], routing.selected[row]
            if routing.restart is not None:
                hidden[i] = routing.restart[row]
    chosen = torch.stack(selected)  # type: ignore[arg-type]
    out: list[Prediction | None] = [None] * len(items)
    for rows in second_pass_batches(chosen, order, batch_size):
        restart = None if hidden[rows[0]] is None else [hidden[i] for i in rows]
        _answer(model, items, collate, rows, torch.stack([probs[i] for i in rows]), chosen[rows],  # type: ignore[misc]
                out, return_features, restart)
    return out  # type: ignore[return-value]


def second_pass_batches(selected: torch.Tensor, order: list[int], batch_size: int) -> list[list[int]]:
    """Batches of sample indices for the second pass: each frequent set's samples in batches of their own
    (size-sorted, longest batch first: it has the most tokens, so it forms the set's dense weights, which the
    set's shorter batches then reuse instead of a side branch each), the rare sets' samples together in mixed
    batches."""
    position = {i: p for p, i in enumerate(order)}
    full, rare = [], []
    for _, index in group_by_task_set(selected):
        rows = sorted(index.tolist(), key=position.__getitem__)
        (full if len(rows) >= FULL_GROUP_FRACTION * batch_size else rare).append(rows)
    batches = [chunk for rows in full for chunk in reversed(_chunks(rows, batch_size))]
    mixed = sorted((i for rows in rare for i in rows), key=position.__getitem__)
    return batches + _chunks(mixed, batch_size)


def _answer(model: MASSModel, items: Sequence[Any], collate: Collate, rows: list[int], probs: torch.Tensor,
            selected: torch.Tensor, out: list[Prediction | None], return_features: bool,
            restart: list[torch.Tensor] | None) -> None:
    batch = collate([items[i] for i in rows])
    features = model.second_pass_features(batch, group_by_task_set(selected), restart)
    task, label = model.choose(features, selected, probs)
    # one copy to the host per batch (not one sync per sample): predictions hold CPU tensors and ints
    tasks, labels, probs, selected = task.tolist(), label.tolist(), probs.cpu(), selected.cpu()
    kept = features.cpu() if return_features else None
    for row, i in enumerate(rows):
        out[i] = Prediction(i, tasks[row], labels[row], probs[row], selected[row],
                            kept[row] if kept is not None else None)


def serve(model: MASSModel, items: Iterable[Any], collate: Collate, *, batch_size: int,
          size_of: Callable[[Any], int] | None = None, window: int | None = None,
          return_features: bool = False, deadline_ms: float | None = None) -> Iterator[Prediction]:
    """Predictions for a stream of inputs, in input order, one window at a time (indices count from 0).

    ``deadline_ms``: a window is also flushed once its first input has waited that long (checked as each input
    arrives), so a server feeding a slow stream bounds its latency; None waits for a full window."""
    window = window or window_batches(len(model.factors.task_names)) * batch_size
    buffer: list[Any] = []
    start, opened = 0, 0.0
    for item in items:
        if not buffer:
            opened = time.monotonic()
        buffer.append(item)
        late = deadline_ms is not None and (time.monotonic() - opened) * 1000.0 >= deadline_ms
        if len(buffer) == window or late:
            yield from _window(model, buffer, collate, batch_size, size_of, return_features, start)
            start, buffer = start + len(buffer), []
    if buffer:
        yield from _window(model, buffer, collate, batch_size, size_of, return_features, start)


def window_batches(num_tasks: int) -> int:
    """Batches routed per window: enough that every task's set mostly fills whole batches."""
    return max(WINDOW_BATCHES, WINDOW_BATCHES_PER_TASK * num_tasks)


def first_pass_batches(sizes: Sequence[int], batch_size: int, num_tasks: int) -> list[list[int]]:
    """Input indices in the batches the first pass forms: windows of ``window_batches(num_tasks)`` batches,
    sorted by size within each window. Also how a fair plain-model baseline is batched (same padding)."""
    window, batches = window_batches(num_tasks) * batch_size, []
    for start in range(0, len(sizes), window):
        rows = _by_size(list(range(start, min(start + window, len(sizes)))), sizes)
        batches += _chunks(rows, batch_size)
    return batches


def _window(model: MASSModel, items: list[Any], collate: Collate, batch_size: int,
            size_of: Callable[[Any], int] | None, return_features: bool, start: int) -> Iterator[Prediction]:
    sizes = [size_of(item) for item in items] if size_of is not None else None
    for p in serve_window(model, items, collate, batch_size=batch_size, sizes=sizes, return_features=return_features):
        yield Prediction(start + p.index, p.task, p.label, p.probs, p.selected, p.features)


__all__ = ["FULL_GROUP_FRACTION", "Prediction", "WINDOW_BATCHES", "WINDOW_BATCHES_PER_TASK", "first_pass_batches",
           "second_pass_batches", "serve", "serve_window", "window_batches"]
