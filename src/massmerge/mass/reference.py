"""The reference path: per task set, every weight formed densely from the exact SVD polar factors
(``ExpertFactors.merged_delta``) and swapped in with ``functional_call``; the slow, independent path the tests
compare the served paths with (``strategy="reference"``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from massmerge.mass.experts import StateDict
from massmerge.mass.restart import RestartState
from massmerge.mass.routed import Pass, active, run_block
from massmerge.mass.setmerge import TaskSet
from massmerge.mass.shared import Batch, Shared
from massmerge.task_vectors import add_delta


class ReferencePass(Pass):
    """The reference path's only pass: plain modules (its weights are swapped in by ``functional_call``), the
    blocks before the restart block skipped as the served second pass skips them."""

    def __init__(self, restart: RestartState) -> None:
        self.restart = restart

    def linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, module.weight, module.bias)

    def embedding(self, module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, module.weight, module.padding_idx, module.max_norm, module.norm_type,
                           module.scale_grad_by_freq, module.sparse)

    def layer_norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)

    def generic(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return module.mass_plain.forward(module, *args, **kwargs)  # type: ignore[attr-defined]

    def block(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if module.mass_block_index < self.restart.block:  # type: ignore[attr-defined]
            return self.restart.output()
        return run_block(module, args, kwargs)


def reference_state(shared: Shared, tasks: TaskSet, alpha: float) -> StateDict:
    """``theta_0 + alpha * TSV-M(tasks)`` of every factored key, dense, from the exact SVD polar factors."""
    delta = shared.factors.merged_delta(tasks)
    return {key: add_delta(shared.base[key], value, alpha) for key, value in delta.items()}


def reference_features(shared: Shared, tasks: TaskSet, alpha: float, batch: Batch,
                       restart: RestartState | None) -> torch.Tensor:
    """Features of ``batch`` under the reference weights of ``tasks`` (swapped into the shared model)."""
    params = {f"model.{key}": value for key, value in reference_state(shared, tasks, alpha).items()}
    with shared.reference_lock, active(None if restart is None else ReferencePass(restart)):
        return functional_call(shared.runner, params, (batch,), strict=False)  # swaps the shared parameters


__all__ = ["ReferencePass", "reference_features", "reference_state"]
