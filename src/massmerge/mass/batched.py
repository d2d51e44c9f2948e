"""One batched second pass for a batch whose samples are routed to different task sets.

Why: serving one forward per task set turns a mixed batch of B samples into up to B batch-1 forwards, which
throws away the batching of the base matmuls (issue 5: 0.10x of the base at batch 16). Here the batch is
permuted so the samples of each set S_g are contiguous rows ``[start_g, stop_g)``, and the model runs ONCE with
the forward of every module that owns a factored parameter replaced for the call:

- ``nn.Linear``: ``y = x W_0^T`` once for all rows, then per group ``y_g += alpha ((x_g V_g) * s_g) U_g^T + b_S``
  (the low-rank side branch of the cached per-set :class:`MergedFactors`), or, for groups with so many tokens
  that forming ``W_0 + alpha U_g diag(s_g) V_g^T`` is cheaper (``strategy`` auto/dense), a transient dense
  weight for that group's rows only. Groups are ordered largest first, so the dense groups of a layer are a
  prefix and the base matmul still runs once over the remaining rows.
- ``nn.Embedding``: ``W_0[ids]`` once, then per group ``alpha (U_g[ids_g] * s_g) V_g^T``.
- ``nn.LayerNorm``: normalization once, then per group ``* (w_0 + alpha dw_S) + (b_0 + alpha db_S)``.

Contiguous groups make every per-group read and write a view (no gather/scatter). Base weights are never
modified and no per-set dense model exists. Any other owner of a factored parameter (a parameter read directly
by its parent's code, a convolution, ...) makes the batch :class:`Unbatchable` and the caller falls back to the
per-group path, which handles every parameter kind.

Sample identity is read from dim 0 of each patched module's input: it must be the batch size, or 1 (a tensor
broadcast over the batch, e.g. BERT's ``position_ids`` of shape ``[1, L]``, expanded here). Anything else raises
:class:`Unbatchable`. Seq-first models (``[L, B, D]``, e.g. older open_clip) are refused up front through their
``batch_first = False`` attribute, because an input with ``L == B`` would otherwise be misread silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from massmerge.mass.model import MergedFactors


class Unbatchable(Exception):
    """The model cannot run this batch with per-group deltas in one forward; use the per-group path."""


@dataclass(frozen=True)
class Group:
    """Rows ``[start, stop)`` of the permuted batch share one task set, with its merged parameters.

    ``matrices``: per-matrix merged factors of the set; ``non_matrix``: ``theta_0 + alpha * mean delta`` of the
    set's non-matrix keys (state-dict names).
    """

    start: int
    stop: int
    matrices: Mapping[str, MergedFactors]
    non_matrix: Mapping[str, torch.Tensor]

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Plan:
    """A permutation of the batch that makes each task set's samples contiguous, largest group first.

    ``order[i]`` is the original index of permuted row i; ``groups`` lists the task sets and their rows.
    """

    order: torch.Tensor
    sets: list[tuple[tuple[int, ...], int, int]]

    @classmethod
    def of(cls, groups: Sequence[tuple[tuple[int, ...], torch.Tensor]]) -> "Plan":
        """From :func:`group_by_task_set` output; stable in the set order among groups of equal size."""
        # Largest first (dense groups form a prefix), then by set size so equal ranks are adjacent (one bmm).
        ordered = sorted(groups, key=lambda group: (-len(group[1]), len(group[0])))
        sets, start = [], 0
        for tasks, index in ordered:
            sets.append((tasks, start, start + len(index)))
            start += len(index)
        return cls(torch.cat([index for _, index in ordered]), sets)

    @property
    def size(self) -> int:
        return int(self.order.numel())

    def unpermute(self, permuted: torch.Tensor) -> torch.Tensor:
        """Rows of a permuted-batch output put back in the original sample order."""
        out = torch.empty_like(permuted)
        out[self.order] = permuted
        return out


Forward = Callable[[torch.Tensor], torch.Tensor]
DenseChoice = Callable[[int, MergedFactors], bool]


def check_batch_first(model: nn.Module) -> str | None:
    """Why the model cannot take the batched path (None when it can): a module declaring ``batch_first=False``."""
    for name, module in model.named_modules():
        if getattr(module, "batch_first", True) is False:
            return f"module '{name or type(module).__name__}' is seq-first (batch_first=False)"
    return None


def unsupported_owner(owners: Mapping[str, nn.Module | None], keys: Sequence[str]) -> str | None:
    """The first factored key whose owner the batched path cannot patch (None when all can be patched)."""
    for key in keys:
        module = owners.get(key.rpartition(".")[0])
        name = key.rpartition(".")[2]
        if type(module) is nn.Linear and name in ("weight", "bias"):
            continue
        if type(module) is nn.Embedding and name == "weight" and module.max_norm is None:
            continue
        if type(module) is nn.LayerNorm and name in ("weight", "bias"):
            continue
        return key
    return None


def align_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with the batch on dim 0: as is, or expanded from a broadcast dim of 1; else :class:`Unbatchable`."""
    if x.ndim >= 1 and x.shape[0] == size:
        return x
    if x.ndim >= 1 and x.shape[0] == 1:
        return x.expand(size, *x.shape[1:])
    raise Unbatchable(f"a patched module got input of shape {list(x.shape)}; the batch has {size} samples")


def runs(groups: Sequence[Group], key: str) -> list[list[Group]]:
    """Consecutive groups with the same sample count and merged rank of ``key``: one bmm each."""
    out: list[list[Group]] = []
    shape = None
    for group in groups:
        this = (group.size, group.matrices[key].s.numel())
        if out and this == shape:
            out[-1].append(group)
        else:
            out.append([group])
        shape = this
    return out


def add_side_stacked(out: torch.Tensor, x: torch.Tensor, groups: Sequence[Group], key: str, alpha: float,
                     offset: int) -> None:
    """``out[g] += alpha ((x_g V_g) * s_g) U_g^T`` for all groups with a few bmm, in place.

    Why batched matmuls: on a shared CPU every small op is a parallel region that waits for descheduled
    threads (measured: 32 small mm 500 ms, the same work as 2 bmm 18 ms, 2 threads, loaded machine). Groups of
    equal size and rank (contiguous rows, as :class:`Plan` orders them) share one stacked bmm.
    ``out``/``x`` hold rows from ``offset`` on; groups without ``key`` are left alone.
    """
    groups = [g for g in groups if key in g.matrices]
    if not groups:
        return
    for run in runs(groups, key):
        factors = [g.matrices[key] for g in run]
        if factors[0].s.numel() == 0:
            continue
        compute = factors[0].U.dtype
        lo, hi = run[0].start - offset, run[-1].stop - offset
        V = torch.stack([f.V for f in factors])
        U = torch.stack([f.U for f in factors])
        s = torch.stack([f.s for f in factors]).mul_(alpha)
        xs = x[lo:hi].reshape(len(run), -1, x.shape[-1]).to(compute)
        inner = torch.bmm(xs, V).mul_(s[:, None, :])
        rows = out[lo:hi]
        if compute == rows.dtype and rows.is_contiguous():
            rows.view(len(run), -1, rows.shape[-1]).baddbmm_(inner, U.transpose(1, 2))
        else:
            rows.add_(torch.bmm(inner, U.transpose(1, 2)).to(rows.dtype).view(rows.shape))


def per_sample(stacked: torch.Tensor, groups: Sequence[Group]) -> torch.Tensor:
    """Rows of a per-group stack ``[G, ...]`` repeated for each sample of its group ``[B, ...]``."""
    sizes = [g.size for g in groups]
    if all(size == 1 for size in sizes):
        return stacked
    return stacked.repeat_interleave(torch.tensor(sizes), dim=0)


def group_rows(values: Sequence[torch.Tensor], groups: Sequence[Group], ndim: int) -> torch.Tensor:
    """Per-group vectors ``[D]`` as per-sample rows shaped to broadcast over an ``ndim`` output ``[B, 1.., D]``."""
    stacked = per_sample(torch.stack(list(values)), groups)
    return stacked.view(stacked.shape[0], *([1] * (ndim - 2)), stacked.shape[-1])


def dense_prefix(groups: Sequence[Group], key: str, rows_per_sample: int, choose: DenseChoice) -> int:
    """How many leading (largest) groups take a transient dense weight for matrix ``key``."""
    count = 0
    for group in groups:
        factors = group.matrices.get(key)  # None: only the bias of this Linear is factored
        if factors is None or not choose(group.size * rows_per_sample, factors):
            break
        count += 1
    return count


def linear_forward(module: nn.Linear, key: str, groups: Sequence[Group], alpha: float,
                   choose: DenseChoice, dense: Callable[[torch.Tensor, MergedFactors], torch.Tensor]) -> Forward:
    """Batched forward of a factored Linear: one base matmul, per-group side branches (or dense prefix)."""
    bias_key = f"{key.rpartition('.')[0]}.bias"
    size = groups[-1].stop

    def bias_of(group: Group) -> torch.Tensor | None:
        return group.non_matrix.get(bias_key, module.bias)

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = align_batch(x, size)
        rows_per_sample = x[:1].numel() // x.shape[-1]
        split = dense_prefix(groups, key, rows_per_sample, choose)
        factored_bias = any(bias_key in g.non_matrix for g in groups)
        shared_bias = None if factored_bias else module.bias
        parts = [F.linear(x[g.start:g.stop], dense(module.weight, g.matrices[key]), bias_of(g))
                 for g in groups[:split]]
        if split < len(groups):
            start = groups[split].start
            rest = F.linear(x[start:], module.weight, shared_bias)
            add_side_stacked(rest, x[start:], groups[split:], key, alpha, offset=start)
            if factored_bias:  # every group has its own bias
                rest.add_(group_rows([bias_of(g) for g in groups[split:]], groups[split:], rest.ndim))
            parts.append(rest)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    return forward


def embedding_forward(module: nn.Embedding, key: str, groups: Sequence[Group], alpha: float,
                      dense: Callable[[torch.Tensor, MergedFactors], torch.Tensor] | None) -> Forward:
    """Batched lookup: ``W_0[ids]`` once plus ``alpha (U_g[ids_g] * s_g) V_g^T`` per group (or dense rows)."""
    size = groups[-1].stop

    def lookup(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, weight, module.padding_idx, None, 2.0, module.scale_grad_by_freq, module.sparse)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        ids = align_batch(ids, size)
        if dense is not None:
            return torch.cat([lookup(ids[g.start:g.stop], dense(module.weight, g.matrices[key])) for g in groups])
        out = lookup(ids, module.weight)
        for g in groups:
            factors = g.matrices[key]
            if factors.s.numel():
                rows = F.embedding(ids[g.start:g.stop], factors.U) * (alpha * factors.s)
                out[g.start:g.stop] += (rows @ factors.V.T).to(out.dtype)
        return out

    return forward


def layer_norm_forward(module: nn.LayerNorm, name: str, groups: Sequence[Group]) -> Forward:
    """Batched LayerNorm: normalize once, then each group's own affine ``w_S``, ``b_S`` on its rows."""
    size = groups[-1].stop

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = align_batch(x, size)
        out = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        if len(module.normalized_shape) != 1:  # rare: several normalized dims, apply per group
            for g in groups:
                rows = out[g.start:g.stop]
                weight = g.non_matrix.get(f"{name}.weight", module.weight)
                bias = g.non_matrix.get(f"{name}.bias", module.bias)
                if weight is not None:
                    rows.mul_(weight)
                if bias is not None:
                    rows.add_(bias)
            return out
        if module.weight is not None:
            out.mul_(group_rows([g.non_matrix.get(f"{name}.weight", module.weight) for g in groups], groups, out.ndim))
        if module.bias is not None:
            out.add_(group_rows([g.non_matrix.get(f"{name}.bias", module.bias) for g in groups], groups, out.ndim))
        return out

    return forward


@contextmanager
def patched_forwards(forwards: Mapping[nn.Module, Forward]) -> Iterator[None]:
    """Rebind ``forward`` of each module for the duration of one call; always undone."""
    done: list[nn.Module] = []
    try:
        for module, forward in forwards.items():
            module.forward = forward  # type: ignore[method-assign]
            done.append(module)
        yield
    finally:
        for module in done:
            del module.forward


__all__ = ["Group", "Plan", "Unbatchable", "check_batch_first", "patched_forwards", "unsupported_owner"]
