"""How the routing layer's input becomes one vector z per sample.

The token must be picked by the model's real layout (published code took ``x[0]`` and got the batch index on
batch-first models); so the layout is an explicit argument, never guessed from the shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

PoolFn = Callable[[torch.Tensor, Any], torch.Tensor]


def token_pool(token_index: int = 0, *, batch_first: bool = True) -> PoolFn:
    """Pick one token (the CLS token at 0 for ViTs) from [B, L, d] (batch_first) or [L, B, d] activations."""

    def pool(activation: torch.Tensor, batch: Any) -> torch.Tensor:
        if activation.ndim == 2:
            return activation
        return activation[:, token_index] if batch_first else activation[token_index]

    return pool


def mean_pool(mask_key: str = "attention_mask", *, batch_first: bool = True) -> PoolFn:
    """Mean over the non-padding tokens given by ``batch[mask_key]`` (all tokens if the batch has no mask)."""

    def pool(activation: torch.Tensor, batch: Any) -> torch.Tensor:
        if activation.ndim == 2:
            return activation
        tokens = activation if batch_first else activation.transpose(0, 1)
        mask = batch.get(mask_key) if isinstance(batch, Mapping) else None
        if mask is None:
            return tokens.mean(dim=1)
        weights = mask.to(tokens.dtype).unsqueeze(-1)
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    return pool


def identity_pool(activation: torch.Tensor, batch: Any) -> torch.Tensor:
    """For models whose routing layer already sees one vector per sample ([B, d])."""
    if activation.ndim != 2:
        raise ValueError(
            f"routing activation has shape {list(activation.shape)}; pass pool=token_pool(...) or mean_pool(...)"
        )
    return activation
