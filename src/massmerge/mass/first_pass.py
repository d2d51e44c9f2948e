"""The first pass: ``theta_0 + alpha * TSV-M(all tasks, de-redundant)`` up to the routing layers, then stop.

The first-pass weights are materialized lazily (once per alpha, only for the layers the pass reaches, by the
``value`` function the engine hands in); each routing layer's input is captured and the forward stops
(:class:`~massmerge.mass.routed.StopForward`) once the deepest one is seen. For a second pass that restarts
at block j (:mod:`massmerge.mass.restart`) it also records the output of block j - 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from massmerge.mass.routed import (
    Pass,
    RoutedEmbedding,
    RoutedLayerNorm,
    RoutedLinear,
    StopForward,
    run_block,
    shallow_copy,
    subtree_keys,
)


class FirstPass(Pass):
    """The first pass: first-pass weights (lazily materialized by ``value``), capture the routing inputs."""

    def __init__(self, value: Callable[[str, torch.Tensor], torch.Tensor], routing_layers: Sequence[str],
                 generic_keys: frozenset[str], record_block: int | None = None) -> None:
        self.value = value  # (key, base tensor) -> first-pass tensor (the base's when the key is not factored)
        self.routing = tuple(routing_layers)
        self.generic_keys = generic_keys
        self.captured: dict[str, torch.Tensor] = {}
        self.record_block = record_block  # a restarting second pass needs this block's output
        self.recorded: Any = None

    def block(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        output = run_block(module, args, kwargs)
        if module.mass_block_index == self.record_block:  # type: ignore[attr-defined]
            self.recorded = output
        return output

    def _param(self, module: nn.Module, name: str) -> torch.Tensor | None:
        base = getattr(module, name)
        return None if base is None else self.value(f"{module.mass_name}.{name}", base)

    def linear(self, module: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
        name = module.mass_name
        if name in self.routing and name not in self.captured:
            self.captured[name] = x
            if len(self.captured) == len(self.routing):
                raise StopForward
        return F.linear(x, self._param(module, "weight"), self._param(module, "bias"))

    def embedding(self, module: RoutedEmbedding, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self._param(module, "weight"), module.padding_idx, module.max_norm, module.norm_type,
                           module.scale_grad_by_freq, module.sparse)

    def layer_norm(self, module: RoutedLayerNorm, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, module.normalized_shape, self._param(module, "weight"), self._param(module, "bias"),
                            module.eps)

    def generic(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        owner = module.mass_name
        prefix = f"{owner}." if owner else ""
        keys = subtree_keys(self.generic_keys, owner)
        params = dict(module.named_parameters(prefix=owner, remove_duplicate=False))
        values = {key: self.value(key, params[key]) for key in keys if key in params}
        return shallow_copy(module, prefix, values, self.generic_keys)(*args, **kwargs)



__all__ = ["FirstPass"]
