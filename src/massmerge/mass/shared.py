"""What every view of one MASS model shares: the base, the factors, the set merges and the caches and locks over
them (first-pass tensors per alpha, task sets' merged values, the dense weights kept for a set's next batches)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from massmerge.mass.budget import tensor_bytes
from massmerge.mass.clock import StageClock
from massmerge.mass.experts import ExpertFactors
from massmerge.mass.lru import LRU
from massmerge.mass.routed import install
from massmerge.mass.second_pass import Ledger, SetData
from massmerge.mass.setmerge import SetMerger, TaskSet
from massmerge.task_vectors import add_delta

FeatureFn = Callable[[nn.Module, Any], torch.Tensor]
Batch = Any
SET_CACHE_SIZE = 256  # merged non-matrix values per (set, alpha); small tensors (biases, norms)
DENSE_SETS_KEPT = 1  # task sets whose dense merged matrices are kept for their next batches (each: one copy
# of the factored matrices; serving sends a set's batches one after another, so one is enough)


def default_features(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Call the model on the batch (a tensor, or a dict of keyword tensors) and expect a [B, d] tensor."""
    out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    if not isinstance(out, torch.Tensor):
        raise TypeError("the model does not return a tensor; pass features=... to pick its final features")
    return out


class FeatureRunner(nn.Module):
    """``features(model, batch)`` as a module, so ``functional_call`` can swap the model's parameters (the
    reference path here; static weights in :mod:`massmerge.experiments.runner`)."""

    def __init__(self, model: nn.Module, features: FeatureFn) -> None:
        super().__init__()
        self.model = model
        self.features = features

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.features(self.model, batch)


class Shared:
    """Everything a MASS model's views share: the base, factors, set merges and the caches over them."""

    def __init__(self, model: nn.Module, factors: ExpertFactors, features: FeatureFn) -> None:
        self.runner = FeatureRunner(model, features)
        self.factors = factors
        self.merger = SetMerger(factors)
        self.base = {key: value.detach() for key, value in model.state_dict(keep_vars=True).items()}
        floating = next((v for v in self.base.values() if v.is_floating_point()), None)
        self.device = floating.device if floating is not None else torch.device("cpu")
        self.dtype = floating.dtype if floating is not None else torch.float32
        self.matrix_keys = frozenset(factors.matrices)
        self.non_matrix_keys = frozenset(factors.non_matrix)
        self.installed = install(model, [*factors.matrices, *factors.non_matrix], [])
        self.batched_off_reason = seq_first_module(model)
        self._first: dict[float, dict[str, torch.Tensor]] = {}
        self._sets: LRU[tuple[TaskSet, float], SetData] = LRU(SET_CACHE_SIZE, max_bytes=self.merger.cache_bytes,
                                                              weigh=set_data_bytes)
        self.kept: LRU[tuple[TaskSet, float], dict[str, torch.Tensor]] = LRU(DENSE_SETS_KEPT)
        self.ledger = Ledger()  # the current run's side-branch costs (second_pass.buy_dense)
        self._first_lock = threading.Lock()
        self.reference_lock = threading.Lock()  # the reference path swaps the shared parameters
        self.clock: StageClock | None = None  # set for a timed block (MASSModel.timed)
        self.blocks: tuple[str, ...] = ()  # the transformer blocks' names, in forward order (restart_block)
        self.block_output_length: int | None = None  # blocks return a tensor (None) or a tuple of this length

    def stage(self, name: str) -> AbstractContextManager[None]:
        """Time the block as stage ``name`` when a clock is running (a no-op otherwise)."""
        return nullcontext() if self.clock is None else self.clock.stage(name)

    # -- first pass ----------------------------------------------------------------------------------------
    def first_pass_value(self, alpha: float) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """(key, base tensor) -> ``theta_0 + alpha * TSV-M(all, de-redundant)`` of that key, made once."""
        with self._first_lock:
            cache = self._first.setdefault(alpha, {})

        def value(key: str, base: torch.Tensor) -> torch.Tensor:
            if key not in self.matrix_keys and key not in self.non_matrix_keys:
                return base
            found = cache.get(key)
            if found is not None:
                return found
            with self._first_lock:
                if key not in cache:
                    cache[key] = self._first_pass_tensor(key, alpha)
                return cache[key]

        return value

    def _first_pass_tensor(self, key: str, alpha: float) -> torch.Tensor:
        base = self.base[key]
        if key in self.matrix_keys:
            tasks = self.merger.first_pass_tasks(key)
            core = self.merger.compute_cores(tasks, [key])[key]
            return add_delta(base, self.merger.dense_delta(key, tasks, core), alpha)
        return add_delta(base, torch.stack(list(self.factors.non_matrix[key])).mean(dim=0), alpha)

    # -- task sets -------------------------------------------------------------------------------------------
    def set_data(self, tasks: TaskSet, alpha: float) -> SetData:
        """The merged parameters of a task set (cores and rows per matrix, values per other key), cached."""
        return self._sets.get_or_make((tasks, alpha), lambda: self._timed_set_data(tasks, alpha))

    def _timed_set_data(self, tasks: TaskSet, alpha: float) -> SetData:
        with self.stage("set merges"):
            return self._make_set_data(tasks, alpha)

    def _make_set_data(self, tasks: TaskSet, alpha: float) -> SetData:
        cores = self.merger.cores(tasks)
        rows = {key: st.rows(tasks) for key, st in self.merger.stacked.items()}
        values = {key: add_delta(self.base[key], torch.stack([per_task[t] for t in tasks]).mean(dim=0), alpha)
                  for key, per_task in self.factors.non_matrix.items()}
        return SetData(tasks, rows, cores, values)

    def dense_value(self, alpha: float) -> Callable[[str, torch.Tensor, SetData], torch.Tensor]:
        """(key, base, set) -> the set's dense parameter, for generic owners (formed per call, not cached)."""

        def value(key: str, base: torch.Tensor, data: SetData) -> torch.Tensor:
            if key in data.values:
                return data.values[key]
            if key in self.matrix_keys:
                delta = self.merger.dense_delta(key, data.tasks, data.cores[key])
                return add_delta(base, delta, alpha)
            return base

        return value


def set_data_bytes(data: SetData) -> int:
    """What a cached set merge holds: its cores (shared with the core cache) and its non-matrix values."""
    return tensor_bytes([*data.cores.values(), *data.values.values()])


def seq_first_module(model: nn.Module) -> str | None:
    """Why one forward cannot hold several task sets: a module that declares ``batch_first=False``."""
    for name, module in model.named_modules():
        if getattr(module, "batch_first", True) is False:
            return f"module '{name or type(module).__name__}' is sequence-first (batch_first=False)"
    return None


__all__ = [
    "DENSE_SETS_KEPT",
    "SET_CACHE_SIZE",
    "FeatureFn",
    "FeatureRunner",
    "Shared",
    "default_features",
    "seq_first_module",
]
