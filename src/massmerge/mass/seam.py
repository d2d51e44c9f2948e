"""The public seam: any forward or ``generate()`` of the served module, each row under its own task set.

``with model.task_sets(rows): model.model.generate(**inputs)`` runs the served module (``MASSModel.model``) with
row ``r`` of the batch under ``theta_0 + alpha * TSV-M(S_r)``: encoder calls see the ``B`` rows, decoder calls
under beam search or ``num_return_sequences`` see ``B * n`` rows laid out as HF lays them out
(``repeat_interleave``), and each maps to its prompt's set (:class:`~massmerge.mass.batch.RowSets`).

Threads: the active pass is a ``ContextVar``, which a new ``Thread`` does not inherit (HF's
``TextIteratorStreamer`` runs ``generate`` in one). Hand the context over explicitly: :meth:`TaskSets.run`
(``Thread(target=sets.run, args=(model.model.generate,), kwargs=...)``), or enter the same object in the worker
(``with sets:`` is re-entrant and per thread), or run a ``contextvars.copy_context()`` taken inside the block.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch

from massmerge.errors import OptionError
from massmerge.mass.routed import ACTIVE, Pass
from massmerge.mass.setmerge import TaskSet

R = TypeVar("R")
Rows = torch.Tensor | Sequence[int | str | Iterable[int | str]]


def row_sets(rows: Rows, task_names: Sequence[str], device: torch.device) -> tuple[list[TaskSet], torch.Tensor]:
    """(distinct task sets, a set index per row) of ``rows``: a ``[B, T]`` bool mask (``Routing.selected``), a
    ``[B]`` task index per row, or per row a task (index or name) or an iterable of them."""
    if isinstance(rows, torch.Tensor):
        rows = [row.nonzero().flatten().tolist() for row in rows.bool()] if rows.ndim == 2 else rows.tolist()
    sets: dict[TaskSet, int] = {}
    ids = []
    for r, row in enumerate(rows):
        items = [row] if isinstance(row, int | str) else list(row)
        tasks = tuple(sorted({_task_index(item, task_names, r) for item in items}))
        if not tasks:
            raise OptionError(f"task_sets: row {r} selects no task")
        ids.append(sets.setdefault(tasks, len(sets)))
    if not ids:
        raise OptionError("task_sets: no rows given")
    return list(sets), torch.tensor(ids, dtype=torch.long, device=device)


def _task_index(item: int | str, task_names: Sequence[str], row: int) -> int:
    if isinstance(item, str):
        if item not in task_names:
            raise OptionError(f"task_sets: row {row}: unknown task '{item}' (tasks: {', '.join(task_names)})")
        return task_names.index(item)
    index = int(item)
    if not 0 <= index < len(task_names):
        raise OptionError(f"task_sets: row {row}: task index {index} out of range [0, {len(task_names)})")
    return index


class TaskSets:
    """The context of one batch's task sets (``sets[ids[r]]`` for row r); reusable and entered per thread."""

    def __init__(self, pass_: Pass, sets: Sequence[TaskSet], ids: torch.Tensor) -> None:
        self.pass_ = pass_
        self.sets = list(sets)
        self.ids = ids
        self._tokens = threading.local()

    def __enter__(self) -> TaskSets:
        stack = getattr(self._tokens, "stack", None)
        if stack is None:
            stack = self._tokens.stack = []
        stack.append(ACTIVE.set(self.pass_))
        return self

    def __exit__(self, *exc: object) -> None:
        ACTIVE.reset(self._tokens.stack.pop())

    def run(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """``fn(*args, **kwargs)`` under these task sets, in the calling thread (the hand-off to a worker)."""
        with self:
            return fn(*args, **kwargs)


__all__ = ["Rows", "TaskSets", "row_sets"]
