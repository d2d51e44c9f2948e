"""The data-free router: how far an input's routing activation lies from each task's input subspace.

``r_t = ||z - V_t V_t^T z||``; scores ``-r`` are standardized across tasks, divided by tau and softmaxed;
tasks with probability above eta are selected, at most K of them, at least the most likely one
(:func:`select`, the paper's rule).

Several routing layers (beyond the paper, whose stated limitation is one fixed layer) combine into one score
per task by :func:`combined_scores`:

- ``standardized``: the mean of each layer's standardized scores, standardized again (one layer: the
  paper's scores exactly);
- ``ppca``: the sum of per-layer log-likelihoods in the probabilistic-PCA reading of the router. Task t
  explains z_l by its subspace plus isotropic noise of variance sigma_l^2 in the other ``d_l - k_l``
  dimensions, so ``log p(z_l | t) = -r_{t,l}^2 / (2 sigma_l^2) + const``; with the data-free estimate
  ``sigma_l^2 = mean_t r_{t,l}^2 / (d_l - k_l)`` (per input) the layer's score is
  ``-(d_l - k_l) / 2 * r_{t,l}^2 / mean_t r_{t,l}^2``, and independent layers add.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from massmerge.mass.config import DEFAULT_ETA, DEFAULT_TAU, DEFAULT_TOP_K, LayerCombine, RoutingMode

STD_FLOOR = 1e-6


@dataclass(frozen=True)
class LayerBases:
    """Every task's basis ``V_t [d, k_t]`` of one routing layer, also stacked once, zero columns padding the
    smaller ranks to ``k_max``: a batch's residuals against all T tasks then take one matmul and one bmm, not T
    chains of small ops. Why: 29 routing layers x 8 tasks x 4 small ops per batch cost 9% of ``predict``, and
    on a shared CPU every small op is a parallel region. The zero columns add exact zeros: the residual is the
    same ``z - (z V) V^T`` as one task at a time."""

    bases: tuple[torch.Tensor, ...]
    side_by_side: torch.Tensor  # [d, T * k_max]: z @ it gives every task's coordinates at once
    transposed: torch.Tensor  # [T, k_max, d]: V_t^T, for the bmm back to input space

    @classmethod
    def of(cls, bases: Sequence[torch.Tensor] | LayerBases) -> LayerBases:
        if isinstance(bases, LayerBases):
            return bases
        offsets = [0]
        for V in bases:
            offsets.append(offsets[-1] + V.shape[1])
        return cls.of_rows(torch.cat([V.T for V in bases]), offsets)

    @classmethod
    def of_rows(cls, rows: torch.Tensor, offsets: Sequence[int]) -> LayerBases:
        """From every task's ``V_t^T`` stacked as rows ``[sum k, d]`` (task t: rows ``offsets[t]:offsets[t+1]``,
        as :class:`~massmerge.mass.setmerge.Stacked` holds them): with equal ranks a view, no copy."""
        spans = list(pairwise(offsets))
        width = max(b - a for a, b in spans)
        if all(b - a == width for a, b in spans) and rows.is_contiguous():
            transposed = rows.view(len(spans), width, rows.shape[1])
        else:
            transposed = rows.new_zeros(len(spans), width, rows.shape[1])
            for t, (a, b) in enumerate(spans):
                transposed[t, :b - a] = rows[a:b]
        bases = tuple(rows[a:b].T for a, b in spans)
        return cls(bases, transposed.reshape(-1, rows.shape[1]).T, transposed)

    @property
    def dim(self) -> int:
        return int(self.transposed.shape[2])

    @property
    def mean_rank(self) -> float:
        return sum(V.shape[1] for V in self.bases) / len(self.bases)


def residuals(z: torch.Tensor, bases: Sequence[torch.Tensor] | LayerBases) -> torch.Tensor:
    """[B, T] projection residual norms of z [B, d] against each orthonormal basis V_t [d, k_t]."""
    stacked = LayerBases.of(bases)
    tasks, width, _ = stacked.transposed.shape
    z = z.to(stacked.transposed.dtype)
    coords = (z @ stacked.side_by_side).view(z.shape[0], tasks, width).transpose(0, 1)  # [T, B, k_max]
    return torch.bmm(coords, stacked.transposed).sub_(z).norm(dim=-1).T


@dataclass(frozen=True)
class _BankGroup:
    layers: tuple[str, ...]
    side_by_side: torch.Tensor  # [G, d, T * w]
    transposed: torch.Tensor  # [G * T, w, d]


class RoutingBank:
    """Every routing layer's bases, grouped by input width (and dtype) and padded to one rank: the residuals of
    all layers of a group take two bmm per batch. Why: the default text router reads 29 layers, and one small
    matmul chain per layer per batch cost ~15% of a base forward on top of the first pass; on a shared CPU every
    small op is a parallel region. The zero columns add exact zeros (as in :class:`LayerBases`); a group of one
    layer is :func:`residuals` itself. Holds one padded copy of the groups' bases."""

    def __init__(self, bases: Mapping[str, LayerBases]) -> None:
        by_width: dict[tuple[int, torch.dtype, int], list[str]] = {}
        for layer, stacked in bases.items():
            shape = stacked.transposed.shape
            by_width.setdefault((shape[2], stacked.transposed.dtype, shape[0]), []).append(layer)
        self.single = {layers[0]: bases[layers[0]] for layers in by_width.values() if len(layers) == 1}
        self.groups = [self._group(layers, bases) for layers in by_width.values() if len(layers) > 1]

    @staticmethod
    def _group(layers: list[str], bases: Mapping[str, LayerBases]) -> _BankGroup:
        first = bases[layers[0]].transposed
        tasks, dim = first.shape[0], first.shape[2]
        width = max(bases[layer].transposed.shape[1] for layer in layers)
        padded = first.new_zeros(len(layers), tasks, width, dim)
        for g, layer in enumerate(layers):
            own = bases[layer].transposed
            padded[g, :, :own.shape[1]] = own
        return _BankGroup(tuple(layers), padded.view(len(layers), tasks * width, dim).transpose(1, 2),
                          padded.view(len(layers) * tasks, width, dim))

    def residuals(self, pooled: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """[B, T] residuals of every layer from its pooled z [B, d] (the same values as :func:`residuals`)."""
        out = {layer: residuals(pooled[layer], stacked) for layer, stacked in self.single.items()}
        for group in self.groups:
            count, width = len(group.layers), group.transposed.shape[1]
            tasks = group.transposed.shape[0] // count
            z = torch.stack([pooled[layer] for layer in group.layers]).to(group.transposed.dtype)  # [G, B, d]
            size = z.shape[1]
            coords = torch.bmm(z, group.side_by_side).view(count, size, tasks, width).transpose(1, 2)
            back = torch.bmm(coords.reshape(count * tasks, size, width), group.transposed)  # [G T, B, d]
            norms = back.view(count, tasks, size, -1).sub_(z.unsqueeze(1)).norm(dim=-1)  # [G, T, B]
            out.update({layer: norms[g].T for g, layer in enumerate(group.layers)})
        return out


def token_residuals(tokens: torch.Tensor, weights: torch.Tensor, bases: Sequence[torch.Tensor] | LayerBases
                    ) -> torch.Tensor:
    """[B, T] root mean square, over each sample's tokens (``weights`` [B, L]: 1 for the tokens that count),
    of every token's projection residual ``||x - V_t V_t^T x||`` (``tokens`` [B, L, d]).

    Why (issue 9, beyond the paper): the mean of a short input's few tokens is a point between them that may lie
    near no task's subspace; the residual of each token keeps how well the subspace explains each of them. One
    token: exactly :func:`residuals` of that token. Computed for all tasks with one matmul per layer:
    ``||x - V V^T x||^2 = ||x||^2 - 2 ||V^T x||^2 + (V^T x)^T (V^T V) (V^T x)``, exact for any V.
    """
    bases = LayerBases.of(bases).bases
    dtype = bases[0].dtype
    x = tokens.to(dtype)
    projected = x @ torch.cat(list(bases), dim=1)  # [B, L, sum k]
    energy = x.square().sum(-1)
    parts = projected.split([V.shape[1] for V in bases], dim=-1)
    squared = torch.stack([energy - 2 * p.square().sum(-1) + ((p @ (V.T @ V)) * p).sum(-1)
                           for p, V in zip(parts, bases)], dim=-1)  # [B, L, T]
    w = weights.to(dtype).unsqueeze(-1)
    return ((squared.clamp_min(0) * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)).sqrt()


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Per row: subtract the mean over tasks, divide by the unbiased std + 1e-6."""
    return (scores - scores.mean(dim=1, keepdim=True)) / (scores.std(dim=1, keepdim=True) + STD_FLOOR)


def probabilities(res: torch.Tensor, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """Softmax over tasks of the standardized scores ``-r`` (unbiased std + 1e-6), divided by tau."""
    return torch.softmax(standardize(-res) / tau, dim=1)


def combined_scores(res_per_layer: Sequence[torch.Tensor], combine: LayerCombine = "standardized",
                    free_dims: Sequence[float] | None = None) -> torch.Tensor:
    """[B, T] routing scores (before ``/ tau`` and the softmax) from each layer's residuals [B, T].

    ``free_dims[l]``: ``d_l - k_l`` of layer l, the dimensions its subspaces leave out (``ppca`` only).
    """
    if combine == "standardized":
        if len(res_per_layer) == 1:
            return standardize(-res_per_layer[0])
        return standardize(torch.stack([standardize(-res) for res in res_per_layer]).mean(dim=0))
    if combine == "ppca":
        if free_dims is None or len(free_dims) != len(res_per_layer):
            raise ValueError("ppca routing needs d - k of every routing layer")
        total = torch.zeros_like(res_per_layer[0])
        for res, free in zip(res_per_layer, free_dims):
            energy = res.square()
            total -= 0.5 * free * energy / energy.mean(dim=1, keepdim=True).clamp_min(torch.finfo(res.dtype).tiny)
        return total
    raise ValueError(f"unknown layer combination {combine!r}")


def route(res_per_layer: Sequence[torch.Tensor], *, combine: LayerCombine = "standardized",
          free_dims: Sequence[float] | None = None, mode: RoutingMode = "topk", eta: float = DEFAULT_ETA,
          top_k: int = DEFAULT_TOP_K, tau: float = DEFAULT_TAU) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [B, T], selected [B, T]) from one or several layers' residuals; one layer with ``standardized``
    is exactly :func:`select` (the paper's rule)."""
    if len(res_per_layer) == 1 and combine == "standardized":
        return select(res_per_layer[0], mode=mode, eta=eta, top_k=top_k, tau=tau)
    size = res_per_layer[0].shape[0]
    if mode == "batch":  # the batch is declared one task: average residuals, one set for all
        res_per_layer = [res.mean(dim=0, keepdim=True) for res in res_per_layer]
    probs = torch.softmax(combined_scores(res_per_layer, combine, free_dims) / tau, dim=1)
    if mode == "top1":
        return probs, topk_selection(probs, eta=-1.0, top_k=1)
    if mode not in ("topk", "batch"):
        raise ValueError(f"unknown routing mode {mode!r}")
    selected = topk_selection(probs, eta, top_k)
    if mode == "batch":
        return probs.expand(size, -1), selected.expand(size, -1)
    return probs, selected


def topk_selection(probs: torch.Tensor, eta: float, top_k: int) -> torch.Tensor:
    """Bool [B, T]: tasks with p > eta, cut to the top K by p; the argmax when none passes."""
    k = min(top_k, probs.shape[1])
    top = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, probs.topk(k, dim=1).indices, True)
    selected = (probs > eta) & top
    best = torch.zeros_like(selected).scatter_(1, probs.argmax(dim=1, keepdim=True), True)
    empty = ~selected.any(dim=1, keepdim=True)
    return torch.where(empty, best, selected)


def select(
    res: torch.Tensor, *, mode: RoutingMode = "topk", eta: float = DEFAULT_ETA, top_k: int = DEFAULT_TOP_K,
    tau: float = DEFAULT_TAU,
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
