"""How the routing layer's input becomes one vector z per sample (design.md section 2.5).

The token must be picked by the model's real layout (published code took ``x[0]`` and got the first *sample* on
batch-first models), so the layout is an explicit setting, never guessed from the shape; the batch axis is
checked against the batch size. Poolings:

- ``cls``: the token at ``token_index`` (0: the class token of a ViT); the paper's rule for vision.
- ``mean``: the mean over the non-padding tokens (``attention_mask``); the paper's rule for text.
- ``content``: the mean over the tokens that are neither padding nor special tokens ([CLS], [SEP], ...). Why
  (issue 9): for a one-word input two of three tokens are [CLS] and [SEP], which look the same for every task,
  so the mean is dominated by them. A text made only of special tokens falls back to ``mean``.
- ``unmasked_mean``: the mean over every position, padding included: what the official MASS code does on
  Flan-T5 (prompts padded to 512); kept for parity runs only, since pad tokens then dominate z.
- ``tokens``: no pooling: the content tokens and their weights ``([B, L, d], [B, L])`` go to the router, which
  takes the root mean square of each token's residual (:func:`massmerge.mass.router.token_residuals`).

A pooler is called as ``pool(activation, batch, pooling=None)``; ``pooling`` overrides its default at serve
time (``massmerge predict --pooling``), which is why it is an argument and not fixed when the pooler is made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from massmerge.errors import OptionError
from massmerge.mass.batch import batch_size_of
from massmerge.mass.config import POOLINGS

Layout = Literal["batch_first", "seq_first"]
PoolFn = Callable[..., Any]  # (activation, batch, pooling=None) -> [B, d] (or ([B, L, d], [B, L]) for tokens)


def _tensor(batch: Any, key: str) -> torch.Tensor | None:
    value = batch.get(key) if isinstance(batch, Mapping) else None
    return value if isinstance(value, torch.Tensor) else None


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``tokens [B, L, D]`` over positions where ``mask [B, L]`` is nonzero (all positions if None).

    The one masked mean of the package: routing pooling, text features and the suite's fine-tuning use it.
    """
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def content_mask(batch: Any, special_ids: Iterable[int]) -> torch.Tensor | None:
    """``attention_mask`` without special tokens; rows left empty keep their attention mask."""
    mask = _tensor(batch, "attention_mask")
    ids = _tensor(batch, "input_ids")
    if ids is None:
        return mask
    special = torch.as_tensor(sorted(set(special_ids)), dtype=ids.dtype, device=ids.device)
    keep = ~torch.isin(ids, special)
    base = torch.ones_like(keep) if mask is None else mask.bool()
    content = keep & base
    empty = ~content.any(dim=1, keepdim=True)
    return torch.where(empty, base, content)


def pool_tokens(activation: torch.Tensor, batch: Any, *, layout: Layout, pooling: str, token_index: int = 0,
                special_ids: Iterable[int] | None = None) -> Any:
    """One vector per sample from a ``[B, L, D]`` (batch_first) or ``[L, B, D]`` (seq_first) activation (for
    ``tokens``: the batch-first tokens and their weights)."""
    if activation.dim() == 2:  # already one vector per sample
        return activation
    if activation.dim() != 3:
        raise OptionError(f"pooling: expected a [B, L, D] or [L, B, D] activation, got shape {list(activation.shape)}")
    tokens = activation if layout == "batch_first" else activation.transpose(0, 1)
    size = batch_size_of(batch)
    if tokens.shape[0] != size:
        raise OptionError(f"pooling: activation {list(activation.shape)} does not have the batch size {size} on "
                          f"the {layout} batch axis; the layout is wrong for this model")
    if pooling == "cls":
        return tokens[:, token_index]
    if pooling == "mean":
        return masked_mean(tokens, _tensor(batch, "attention_mask"))
    if pooling == "unmasked_mean":  # the official Flan-T5 code's mean, padding included (parity only)
        return tokens.mean(dim=1)
    if pooling in ("content", "tokens"):
        if special_ids is None:
            raise OptionError(f"--pooling {pooling}: the model's special token ids are unknown (build the artifact "
                              "from a directory with tokenizer files)")
        mask = content_mask(batch, special_ids)
        if pooling == "tokens":
            weights = tokens.new_ones(tokens.shape[:2]) if mask is None else mask.to(tokens.dtype)
            return tokens, weights
        return masked_mean(tokens, mask)
    raise OptionError(f"--pooling: unknown pooling '{pooling}' (choose {', '.join(POOLINGS)})")


@dataclass(frozen=True)
class TokenPooler:
    """A pooler with a default pooling, the token layout and (for ``content``) the special token ids."""

    pooling: str = "mean"
    layout: Layout = "batch_first"
    token_index: int = 0
    special_ids: tuple[int, ...] | None = None

    def __call__(self, activation: torch.Tensor, batch: Any, pooling: str | None = None) -> Any:
        return pool_tokens(activation, batch, layout=self.layout, pooling=pooling or self.pooling,
                           token_index=self.token_index, special_ids=self.special_ids)


def token_pool(token_index: int = 0, *, batch_first: bool = True) -> TokenPooler:
    """Pick one token (the CLS token at 0 for ViTs) by the given layout."""
    return TokenPooler("cls", "batch_first" if batch_first else "seq_first", token_index)


def mean_pool(*, batch_first: bool = True, special_ids: Iterable[int] | None = None) -> TokenPooler:
    """Mean over the non-padding tokens of ``batch['attention_mask']`` (all tokens if the batch has none)."""
    ids = None if special_ids is None else tuple(special_ids)
    return TokenPooler("mean", "batch_first" if batch_first else "seq_first", special_ids=ids)


def identity_pool(activation: torch.Tensor, batch: Any, pooling: str | None = None) -> torch.Tensor:
    """For models whose routing layer already sees one vector per sample ([B, d])."""
    if activation.ndim != 2:
        raise OptionError(f"pooling: routing activation has shape {list(activation.shape)}; pass "
                          "pool=token_pool(...) or mean_pool(...)")
    return activation


__all__ = ["POOLINGS", "PoolFn", "TokenPooler", "content_mask", "identity_pool", "masked_mean",
           "mean_pool", "pool_tokens", "token_pool"]
