"""Classification heads and the rules that pick a task when the task is not given.

CLIP-style zero-shot heads use cosine logits times a shared logit scale, which is what makes the best logits
of different tasks comparable; linear heads come from a model's own classifier.

Head rules (:func:`choose`), applied among the tasks the router selected for each sample:

- ``max_logit`` (the paper): the task whose best logit is largest wins, its argmax is the class.
- ``posterior``: the joint argmax over (task, class) of ``log p(task | x) + log softmax(logits_task)[class]``,
  with ``p(task | x)`` the router's probabilities. Why: max-logit compares raw logits of label spaces of
  different sizes and class-name quality, and so can overrule a confident, correct router (issue 9). The
  per-task softmax, though, favours tasks with few classes (a 2-class head's best class has p >= 0.5).
- ``joint``: the joint argmax of ``log p(task | x) + logits_task[class]``: the head's logits read as
  unnormalized log-likelihoods of (task, class), the router's probability as the task prior; no per-task
  normalization, so no bias by the number of classes.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def choose(logits_per_task: Sequence[torch.Tensor], allowed: torch.Tensor, *, rule: str = "max_logit",
           probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(task [B], class [B]) by ``rule`` among the tasks ``allowed`` [B, T] (bool; every row has one).

    ``logits_per_task[t]``: task t's logits [B, C_t] for every sample; ``probs`` [B, T]: the router's
    probabilities (needed by ``posterior``).
    """
    if rule == "max_logit":
        scores = torch.stack([logits.max(dim=1).values for logits in logits_per_task], dim=1)
        labels = torch.stack([logits.argmax(dim=1) for logits in logits_per_task], dim=1)
    elif rule == "joint":
        if probs is None:
            raise ValueError("the joint head rule needs the router's probabilities")
        best = [logits.float().max(dim=1) for logits in logits_per_task]
        scores = torch.log(probs.float().clamp_min(torch.finfo(torch.float32).tiny)) + torch.stack(
            [b.values for b in best], dim=1)
        labels = torch.stack([b.indices for b in best], dim=1)
    elif rule == "posterior":
        if probs is None:
            raise ValueError("the posterior head rule needs the router's probabilities")
        best = [torch.log_softmax(logits.float(), dim=1).max(dim=1) for logits in logits_per_task]
        scores = torch.log(probs.float().clamp_min(torch.finfo(torch.float32).tiny)) + torch.stack(
            [b.values for b in best], dim=1)
        labels = torch.stack([b.indices for b in best], dim=1)
    else:
        raise ValueError(f"unknown head rule {rule!r} (choose max_logit, posterior or joint)")
    scores = scores.float().masked_fill(~allowed, float("-inf"))
    task = scores.argmax(dim=1)
    return task, labels.gather(1, task[:, None]).squeeze(1)


def select_by_max_logit(logits_per_task: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(winning position in ``logits_per_task`` [B], its argmax class [B]).

    Each entry is one candidate task's logits [B, C_t] (C_t may differ); the task whose best logit is the
    largest wins and its own argmax is the predicted class.
    """
    best = torch.stack([logits.max(dim=1).values for logits in logits_per_task], dim=1)
    winner = best.argmax(dim=1)
    labels = torch.stack([logits.argmax(dim=1) for logits in logits_per_task], dim=1)
    return winner, labels.gather(1, winner[:, None]).squeeze(1)
