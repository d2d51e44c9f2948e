"""What an experiment runs on: T tasks, each with its head and its labelled evaluation splits.

FusionBench splits a benchmark into a model pool, an algorithm and a task pool; this is the task pool, without a
config framework. The suite (packaged text, fine-tuned MiniLM experts) and ``massmerge evaluate`` (a user's
checkpoints and datasets) each fill one; :mod:`massmerge.experiments.runner` scores every method on it.

Each split gives the same samples two ways: padded ``batches`` for static models (one forward of the model per
batch) and per-sample ``items`` for the served MASS model, which batches a stream itself as ``massmerge
predict`` does (:func:`massmerge.mass.serving.serve`, with the pool's ``collate`` and ``size_of``). Both are in
the order of ``labels``, and both are made on demand by every pass: ``massmerge evaluate`` decodes (or reads from
its uint8 cache) one batch of images at a time, and the runner consumes ``items`` as a stream (the served MASS
pass holds one serving window, never a split), so peak memory does not grow with the test sets
(bench/eval_memory.py). Only the suite's small tokenized text splits are held in lists (:meth:`TaskSplit.of_lists`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from massmerge.errors import OptionError

Batch = Any
FeatureFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass
class TaskSplit:
    """One task's labelled split: padded batches and per-sample items, both in the order of ``labels``."""

    labels: torch.Tensor  # [N] long, class indices in the task's label order
    batches: Callable[[], Iterable[Batch]]  # padded batches for static models (their labels: consecutive rows)
    items: Callable[[], Iterable[Any]]  # per-sample inputs for the served model: a fresh stream per call

    @property
    def size(self) -> int:
        return int(self.labels.numel())

    @classmethod
    def of_lists(cls, labels: torch.Tensor, batches: Sequence[Batch], items: Sequence[Any]) -> TaskSplit:
        """A split held in memory (the suite tokenizes each split once)."""
        return cls(labels, lambda: batches, lambda: items)


@dataclass
class TaskPool:
    """The tasks of one experiment: names, heads, splits by name, and how the served model batches items."""

    names: list[str]
    heads: list[nn.Module]
    splits: dict[str, list[TaskSplit]]  # "test" always; "val" where the front end has one
    collate: Callable[[Sequence[Any]], Batch]
    features: FeatureFn  # runs a model to the final features the heads read
    size_of: Callable[[Any], int] | None = None  # an item's size (tokens), for length-sorted batches
    descriptions: list[str] = field(default_factory=list)
    classes: list[list[str]] = field(default_factory=list)

    def split(self, name: str) -> list[TaskSplit]:
        if name not in self.splits:
            raise OptionError(f"split: this experiment has no '{name}' split (it has {', '.join(self.splits)})")
        return self.splits[name]

    @property
    def num_tasks(self) -> int:
        return len(self.names)

    def subset(self, indices: Sequence[int]) -> TaskPool:
        """The pool of tasks ``indices`` alone (in that order), sharing every split and head."""
        pick = list(indices)
        return TaskPool([self.names[i] for i in pick], [self.heads[i] for i in pick],
                        {name: [tasks[i] for i in pick] for name, tasks in self.splits.items()}, self.collate,
                        self.features, self.size_of, [self.descriptions[i] for i in pick] if self.descriptions else [],
                        [self.classes[i] for i in pick] if self.classes else [])  # fmt: skip


__all__ = ["Batch", "FeatureFn", "TaskPool", "TaskSplit"]
