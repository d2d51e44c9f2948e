"""Classification heads: what turns final features into one task's logits.

CLIP-style zero-shot heads use cosine logits times a shared logit scale, which is what makes the best logits
of different tasks comparable; linear heads come from a model's own classifier. How a task is picked among
several heads is :mod:`massmerge.heads.rules`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class LinearHead(nn.Module):
    """``x W^T + b`` with a frozen weight [C, d] (and optional bias [C])."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features.to(self.weight.dtype), self.weight, self.bias)


class ZeroShotHead(nn.Module):
    """``scale * normalize(x) @ normalize(E)^T`` with E [C, d] the class embeddings (averaged over templates)."""

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: float = 100.0) -> None:
        super().__init__()
        self.register_buffer("weight", F.normalize(class_embeddings.detach().float(), dim=-1))
        self.logit_scale = float(logit_scale)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(features.float(), dim=-1) @ self.weight.T


__all__ = ["LinearHead", "ZeroShotHead"]
