"""The data-free router: how far an input's routing activation lies from each task's input subspace.

``r_t = ||z - V_t V_t^T z||``; scores ``-r`` are standardized across tasks, divided by tau and softmaxed;
tasks with probability above eta are selected, at most K of them, at least the most likely one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from massmerge.mass.config import RoutingMode

STD_FLOOR = 1e-6


def residuals(z: torch.Tensor, bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, T] projection residual norms of z [B, d] against each orthonormal basis V_t [d, k_t]."""
    z = z.to(bases[0].dtype)
    return torch.stack([(z - (z @ V) @ V.T).norm(dim=1) for V in bases], dim=1)


def probabilities(res: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Softmax over tasks of the standardized scores ``-r`` (unbiased std + 1e-6), divided by tau."""
    scores = -res
    standardized = (scores - scores.mean(dim=1, keepdim=True)) / (scores.std(dim=1, keepdim=True) + STD_FLOOR)
    return torch.softmax(standardized / tau, dim=1)


def topk_selection(probs: torch.Tensor, eta: float, top_k: int) -> torch.Tensor:
    """Bool [B, T]: tasks with p > eta, cut to the top K by p; the argmax when none passes."""
    k = min(top_k, probs.shape[1])
    top = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, probs.topk(k, dim=1).indices, True)
    selected = (probs > eta) & top
    best = torch.zeros_like(selected).scatter_(1, probs.argmax(dim=1, keepdim=True), True)
    empty = ~selected.any(dim=1, keepdim=True)
    return torch.where(empty, best, selected)


def select(
    res: torch.Tensor, *, mode: RoutingMode = "topk", eta: float = 0.2, top_k: int = 3, tau: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [B, T], selected bool [B, T]) for the routing ``mode``.

    ``topk``: per sample, the eta/K rule. ``top1``: the argmax only. ``batch``: the batch is declared to be
    one task, so residuals are averaged over it and every sample gets the same set by the eta/K rule.
    """
    if mode == "batch":
        probs = probabilities(res.mean(dim=0, keepdim=True), tau)
        selected = topk_selection(probs, eta, top_k)
        return probs.expand(res.shape[0], -1), selected.expand(res.shape[0], -1)
    probs = probabilities(res, tau)
    if mode == "top1":
        return probs, topk_selection(probs, eta=-1.0, top_k=1)
    if mode == "topk":
        return probs, topk_selection(probs, eta, top_k)
    raise ValueError(f"unknown routing mode {mode!r}")
