"""The two-pass MASS model: route each input to a few task subspaces, then run the model merged from them.

1. First pass: ``theta_0 + alpha * TSV-M(all tasks, de-redundant)`` up to the routing layer only (an
   exception stops the forward once the layer's input is captured).
2. Router: projection residuals of the pooled activation against each task's right singular vectors.
3. Second pass: per group of samples sharing a selected set S, ``theta_0 + alpha * TSV-M(S)``.
4. Heads: each selected task's head on the final features; the largest best logit picks (task, class).

This module is the straightforward reference path: the second pass forms dense merged weights per group
(from cached per-set merged factors) and runs the model through ``torch.func.functional_call``, so the
base model itself is never modified.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from massmerge.errors import OptionError
from massmerge.heads import select_by_max_logit
from massmerge.lowrank import LowRank, polar
from massmerge.mass import router
from massmerge.mass.config import MASSConfig
from massmerge.mass.experts import ExpertFactors
from massmerge.mass.pooling import PoolFn, identity_pool

FeatureFn = Callable[[nn.Module, Any], torch.Tensor]
Batch = Any
MERGED_SET_CACHE_SIZE = 64


def default_features(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Call the model on the batch (a tensor, or a dict of keyword tensors) and expect a [B, d] tensor."""
    out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    if not isinstance(out, torch.Tensor):
        raise TypeError("the model does not return a tensor; pass features=... to pick its final features")
    return out


def batch_size(batch: Batch) -> int:
    """Number of samples in a tensor batch or a dict of tensors."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError("batch holds no tensor")


def index_batch(batch: Batch, index: torch.Tensor) -> Batch:
    """The samples ``index`` of a tensor batch or of every per-sample tensor in a dict batch."""
    if isinstance(batch, torch.Tensor):
        return batch[index]
    size = batch_size(batch)
    return {
        key: value[index] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == size else value
        for key, value in batch.items()
    }


class _StopForward(Exception):
    """Raised by the routing-layer hook to end the first pass early."""


@dataclass
class MASSOutput:
    """Predictions for a batch: the chosen task and class, and how the router saw each sample."""

    task: torch.Tensor  # [B] long, index into task_names
    label: torch.Tensor  # [B] long, class index in that task's label space
    probs: torch.Tensor  # [B, T] router probabilities (one-hot in oracle mode)
    selected: torch.Tensor  # [B, T] bool, the task set S of each sample
    residuals: torch.Tensor | None  # [B, T] projection residuals (None in oracle mode)


@dataclass
class MergedFactors:
    """TSV-M of a task set as factors: ``U diag(s) V^T`` with polar U, V (cached per set, not dense)."""

    U: torch.Tensor
    s: torch.Tensor
    V: torch.Tensor

    @classmethod
    def of(cls, factors: Sequence[LowRank]) -> "MergedFactors":
        nonzero = [f for f in factors if f.rank > 0]
        if not nonzero:  # no task changed this matrix: an empty (rank-0) delta
            return cls(factors[0].U[:, :0], factors[0].s[:0], factors[0].V[:, :0])
        factors = nonzero
        U = torch.cat([f.U for f in factors], dim=1)
        V = torch.cat([f.V for f in factors], dim=1)
        return cls(polar(U), torch.cat([f.s for f in factors]), polar(V))

    def dense(self) -> torch.Tensor:
        return (self.U * self.s) @ self.V.T


class _Runner(nn.Module):
    """Wraps ``features(model, batch)`` as a module so functional_call can swap the model's parameters."""

    def __init__(self, model: nn.Module, features: FeatureFn) -> None:
        super().__init__()
        self.model = model
        self.features = features

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.features(self.model, batch)


class MASSModel(nn.Module):
    """MASS over any model whose routing layer is an ``nn.Linear`` named in ``config.routing_layer``.

    ``factors`` keys must be names in ``base_model.state_dict()``; ``heads[t]`` maps final features to task
    t's logits. ``pool(activation, batch)`` makes z from the routing layer's input; ``features(model, batch)``
    runs the model to its final features.
    """

    def __init__(
        self,
        base_model: nn.Module,
        factors: ExpertFactors,
        heads: Sequence[nn.Module],
        config: MASSConfig,
        *,
        pool: PoolFn = identity_pool,
        features: FeatureFn = default_features,
    ) -> None:
        super().__init__()
        self.runner = _Runner(base_model.eval(), features)
        self.factors = factors
        self.heads = nn.ModuleList(heads)
        self.config = config
        self.pool = pool
        self._check(base_model)
        self.routing_module = base_model.get_submodule(config.routing_layer)
        self.routing_basis = factors.routing_basis(f"{config.routing_layer}.weight")
        self._base_state = {k: v.detach() for k, v in base_model.state_dict().items()}
        self._first_pass_params: dict[str, torch.Tensor] | None = None
        self._set_cache: OrderedDict[tuple[int, ...], dict[str, MergedFactors]] = OrderedDict()

    @property
    def model(self) -> nn.Module:
        return self.runner.model

    @property
    def task_names(self) -> list[str]:
        return self.factors.task_names

    def _check(self, base_model: nn.Module) -> None:
        names = dict(base_model.named_modules())
        layer = self.config.routing_layer
        if layer not in names:
            linear = [n for n, m in names.items() if isinstance(m, nn.Linear)][:3]
            raise OptionError(f"--routing-layer '{layer}' is not a module of the model (e.g. {linear})")
        if not isinstance(names[layer], nn.Linear):
            raise OptionError(f"--routing-layer '{layer}' is a {type(names[layer]).__name__}, not an nn.Linear")
        if len(self.heads) != self.factors.num_tasks:
            raise OptionError(f"--heads: {len(self.heads)} heads for {self.factors.num_tasks} tasks")
        state_keys = set(base_model.state_dict())
        missing = [k for k in [*self.factors.matrices, *self.factors.non_matrix] if k not in state_keys]
        if missing:
            raise OptionError(f"task factor key '{missing[0]}' is not a parameter of the model")

    # ----- parameters -----------------------------------------------------------------------------------

    def _params_from_delta(self, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        alpha = self.config.alpha
        out = {}
        for key, value in delta.items():
            base = self._base_state[key]
            compute = torch.promote_types(value.dtype, torch.float32)
            out[key] = (base.to(compute) + alpha * value.to(compute)).to(base.dtype)
        return out

    def first_pass_params(self) -> dict[str, torch.Tensor]:
        """``theta_0 + alpha * TSV-M(all tasks)`` with de-redundancy, computed once."""
        if self._first_pass_params is None:
            every = range(self.factors.num_tasks)
            self._first_pass_params = self._params_from_delta(self.factors.merged_delta(every, first_pass=True))
        return self._first_pass_params

    def merged_set(self, tasks: tuple[int, ...]) -> dict[str, MergedFactors]:
        """Per-matrix TSV-M factors of a task set, cached (LRU) by the set; factors, not dense weights."""
        if tasks in self._set_cache:
            self._set_cache.move_to_end(tasks)
            return self._set_cache[tasks]
        merged = {key: MergedFactors.of([per_task[t] for t in tasks]) for key, per_task in self.factors.matrices.items()}
        self._set_cache[tasks] = merged
        if len(self._set_cache) > MERGED_SET_CACHE_SIZE:
            self._set_cache.popitem(last=False)
        return merged

    def set_params(self, tasks: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Dense ``theta_0 + alpha * TSV-M(S)`` for the merged keys (the reference second pass)."""
        delta: dict[str, torch.Tensor] = {key: mf.dense() for key, mf in self.merged_set(tasks).items()}
        for key, per_task in self.factors.non_matrix.items():
            delta[key] = torch.stack([per_task[t] for t in tasks]).mean(dim=0)
        return self._params_from_delta(delta)

    # ----- passes ---------------------------------------------------------------------------------------

    def routing_activation(self, batch: Batch, *, early_exit: bool = True) -> torch.Tensor:
        """Pooled input z [B, d] of the routing layer under the first-pass weights."""
        captured: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            captured.append(args[0])
            if early_exit:
                raise _StopForward

        handle = self.routing_module.register_forward_pre_hook(hook)
        try:
            self._call(self.first_pass_params(), batch)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise OptionError(f"--routing-layer '{self.config.routing_layer}' was never called in the forward pass")
        return self.pool(captured[0], batch)

    def route(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(residuals, probs, selected) for a batch, by the configured routing mode."""
        z = self.routing_activation(batch)
        res = router.residuals(z, self.routing_basis)
        cfg = self.config
        probs, selected = router.select(res, mode=cfg.mode, eta=cfg.eta, top_k=cfg.top_k, tau=cfg.tau)
        return res, probs, selected

    def features_with(self, tasks: tuple[int, ...], batch: Batch) -> torch.Tensor:
        """Final features of ``batch`` under ``theta_0 + alpha * TSV-M(tasks)``."""
        return self._call(self.set_params(tasks), batch)

    def _call(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Run ``features(model, batch)`` with ``params`` (model state-dict names) swapped in, base untouched."""
        swapped = {f"model.{key}": value for key, value in params.items()}
        return functional_call(self.runner, swapped, (batch,), strict=False)

    def _second_pass(self, batch: Batch, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = selected.shape[0]
        task = torch.empty(size, dtype=torch.long)
        label = torch.empty(size, dtype=torch.long)
        for tasks, index in group_by_task_set(selected):
            feats = self.features_with(tasks, index_batch(batch, index))
            winner, labels = select_by_max_logit([self.heads[t](feats) for t in tasks])
            task[index] = torch.tensor(tasks)[winner]
            label[index] = labels
        return task, label

    @torch.no_grad()
    def forward(self, batch: Batch, task: int | torch.Tensor | None = None) -> MASSOutput:
        """Predict (task, class) per sample; with ``task`` given (oracle mode) the router is skipped."""
        if task is not None:
            return self._oracle(batch, task)
        res, probs, selected = self.route(batch)
        pred_task, label = self._second_pass(batch, selected)
        return MASSOutput(pred_task, label, probs, selected, res)

    def _oracle(self, batch: Batch, task: int | torch.Tensor) -> MASSOutput:
        size = batch_size(batch)
        tasks = torch.as_tensor(task, dtype=torch.long).expand(size) if not torch.is_tensor(task) or task.ndim == 0 \
            else task.long()
        selected = torch.zeros(size, self.factors.num_tasks, dtype=torch.bool)
        selected[torch.arange(size), tasks] = True
        pred_task, label = self._second_pass(batch, selected)
        return MASSOutput(pred_task, label, selected.float(), selected, None)


def group_by_task_set(selected: torch.Tensor) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Group sample indices by their selected task set, so samples sharing S share one second pass."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, mask in enumerate(selected.tolist()):
        groups.setdefault(tuple(i for i, on in enumerate(mask) if on), []).append(row)
    return [(tasks, torch.tensor(rows, dtype=torch.long)) for tasks, rows in sorted(groups.items())]
