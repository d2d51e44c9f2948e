"""What a MASS model needs of its parts, checked before any work, and where its parts are placed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from massmerge.device import resolve_device
from massmerge.errors import OptionError
from massmerge.mass.config import ServeSettings
from massmerge.mass.experts import ExpertFactors


def check_restart(blocks: Sequence[str], settings: ServeSettings) -> None:
    """``restart_block`` names a block the first pass reaches: at most the block of the deepest routing layer
    (the first pass stops there), and the model's blocks must be known (an adapter's, or ``blocks=``)."""
    j = settings.restart_block
    if not j:
        return
    if not blocks:
        raise OptionError("--restart-block: the model's transformer blocks are unknown (load an adapter artifact, "
                          "or pass blocks=[...] with the block modules' names)")
    deepest = settings.routing_layers[-1]
    routing_block = next((i for i, name in enumerate(blocks) if deepest.startswith(name + ".")), None)
    if routing_block is None:
        raise OptionError(f"--restart-block: the routing layer '{deepest}' is in none of the model's blocks")
    if j > routing_block:
        raise OptionError(f"--restart-block {j}: the first pass stops in block {routing_block} (routing layer "
                          f"'{deepest}'), so the second pass can restart at block {routing_block} at the latest")


def place(base_model: nn.Module, factors: ExpertFactors, heads: nn.Module, device: torch.device | str | None,
          dtype: torch.dtype | None) -> None:
    """Move a MASS model's parts, in place, to ``device`` and the base to the serving ``dtype``.

    The factors follow in float16 for float16 serving and stay float32 otherwise: bfloat16's 8-bit mantissa
    is too coarse for the router, whose residuals differ across tasks by a few percent (on the toy model of the
    tests it misrouted 4% of inputs against 0% with float32 factors). Heads keep their float32 weights (their
    logits are compared across tasks)."""
    device = resolve_device(device) if device is not None else None
    base_model.to(device=device, dtype=dtype)
    factors.to(device, torch.float16 if dtype == torch.float16 else torch.float32 if dtype is not None else None)
    heads.to(device=device)


def check_parts(base_model: nn.Module, factors: ExpertFactors, heads: Sequence[nn.Module],
                settings: ServeSettings) -> None:
    """What a MASS model needs of its parts (routing layers that are ``nn.Linear`` modules of the model, a head
    per task, factor keys that are the model's parameters), checked before any work: ``MASSModel`` runs it,
    and ``massmerge build``, which writes an artifact from the parts without serving them."""
    layers = settings.routing_layers
    if not layers:
        raise OptionError("--routing-layer: no routing layer given (name the nn.Linear whose input routes)")
    names = dict(base_model.named_modules())
    for layer in layers:
        if layer not in names:
            linear = [n for n, m in names.items() if isinstance(m, nn.Linear)][:3]
            raise OptionError(f"--routing-layer '{layer}' is not a module of the model (e.g. {linear})")
        if not isinstance(names[layer], nn.Linear):
            raise OptionError(f"--routing-layer '{layer}' is a {type(names[layer]).__name__}, not an nn.Linear")
        factors.routing_basis(f"{layer}.weight")  # names the layer if it has no task factors
    if heads and len(heads) != factors.num_tasks:  # none: a model that generates (no class heads)
        raise OptionError(f"--heads: {len(heads)} heads for {factors.num_tasks} tasks")
    state_keys = set(base_model.state_dict())
    missing = [k for k in [*factors.matrices, *factors.non_matrix] if k not in state_keys]
    if missing:
        raise OptionError(f"task factor key '{missing[0]}' is not a parameter of the model")


__all__ = ["check_parts", "check_restart", "place"]
