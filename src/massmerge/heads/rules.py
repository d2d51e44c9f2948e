"""The rules that pick a task (and its class) among several heads when the task is not given.

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



__all__ = ["choose", "select_by_max_logit"]
