"""The second pass: every sample under ``theta_0 + alpha * TSV-M(S)`` of its own task set S, in one forward.

The batch is ordered so each task set's samples are contiguous rows ``[start, stop)`` (:class:`Plan`). A Linear
runs ``x W_0^T`` once over all rows and adds each group's low-rank side branch ``alpha ((x_g V_S) C_S^T)
U_S^T`` (:mod:`massmerge.mass.setmerge`), batched with ``bmm`` over groups of equal size and rank, or, for groups
with many tokens, a transient dense weight (kept for the set's next batches). An Embedding adds ``alpha
(U_S[ids] C_S) V_S^T``; a LayerNorm normalizes once and applies each group's affine. A generic owner runs, per
group, a shallow copy of itself whose parameters (and those of generic owners below it) hold the group's dense
values, on the group's rows. With one group covering the whole batch nothing is split, so that case works for
any token layout (sequence-first models included).

Sample identity is read from dim 0 of a routed module's input: it must be the batch size, or 1 (a tensor
broadcast over the batch, e.g. BERT's ``position_ids`` ``[1, L]``); anything else raises
:class:`~massmerge.mass.routed.Unbatchable` and the caller runs one forward per task set instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from massmerge.mass.lru import LRU
from massmerge.mass.restart import RestartState
from massmerge.mass.routed import (
    Pass,
    RoutedEmbedding,
    RoutedLayerNorm,
    RoutedLinear,
    Unbatchable,
    active,
    run_block,
    shallow_copy,
    subtree_keys,
)
from massmerge.mass.setmerge import SetMerger, Stacked, TaskSet
from massmerge.task_vectors import add_delta

# Memory passes of forming a dense weight (matmul output, add, cast), counted in units of m*n flops.
DENSE_OVERHEAD = 3


@dataclass(frozen=True)
class SetData:
    """One task set's merged parameters: per matrix key its rows in the stacked factors and its core; per
    non-matrix key ``theta_0 + alpha * mean delta`` (for the set's alpha)."""

    tasks: TaskSet
    rows: Mapping[str, torch.Tensor]
    cores: Mapping[str, torch.Tensor]
    values: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Group:
    """Rows ``[start, stop)`` of the (ordered) batch share one task set."""

    start: int
    stop: int
    data: SetData

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Plan:
    """A permutation that makes each task set's samples contiguous, largest group first (so the groups that
    take a dense weight form a prefix), then by set size (so equal ranks are adjacent: one bmm)."""

    order: torch.Tensor  # order[i] = original index of ordered row i
    spans: list[tuple[TaskSet, int, int]]

    @classmethod
    def of(cls, groups: Sequence[tuple[TaskSet, torch.Tensor]]) -> Plan:
        ordered = sorted(groups, key=lambda group: (-len(group[1]), len(group[0])))
        spans, start = [], 0
        for tasks, index in ordered:
            spans.append((tasks, start, start + len(index)))
            start += len(index)
        return cls(torch.cat([index for _, index in ordered]), spans)

    def unpermute(self, ordered: torch.Tensor) -> torch.Tensor:
        """Rows of an ordered-batch output put back in the original sample order."""
        out = torch.empty_like(ordered)
        out[self.order] = ordered
        return out


def use_dense(tokens: int, rank: int, m: int, n: int) -> bool:
    """Whether forming ``W_0 + alpha U_S C_S V_S^T`` is cheaper than the side branch for ``tokens`` rows."""
    dense = rank * rank * m + rank * m * n + DENSE_OVERHEAD * m * n
    return dense < tokens * (rank * (m + n) + rank * rank)


def align_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with the batch on dim 0: as is, or expanded from a broadcast dim of 1; else :class:`Unbatchable`."""
    if x.ndim >= 1 and x.shape[0] == size:
        return x
    if x.ndim >= 1 and x.shape[0] == 1:
        return x.expand(size, *x.shape[1:])
    raise Unbatchable(f"a routed module got input of shape {list(x.shape)}; the batch has {size} samples")


@dataclass
class SecondPass(Pass):
    """The second pass over groups of rows, each with its task set's merged parameters (see module doc)."""

    groups: list[Group]
    size: int
    merger: SetMerger
    alpha: float
    generic_keys: frozenset[str]
    dense_value: Callable[[str, torch.Tensor, SetData], torch.Tensor]  # generic keys: theta_0 + alpha delta_S
    strategy: str = "auto"  # auto | side | dense: how a Linear applies a group's delta
    # (set, alpha) -> key -> the set's dense weight W_0 + alpha U_S C_S V_S^T, kept across batches (auto and dense
    # strategies). Why: serving sends a set's batches one after another, so forming its weights once instead of
    # once per batch saves k m n flops per matrix and batch (about 7% of predict at T = 8)
    kept: LRU[tuple[TaskSet, float], dict[str, torch.Tensor]] | None = None
    restart: RestartState | None = None  # blocks before restart.block return the first pass's hidden states
    _whole: bool = field(init=False)

    # -- blocks ---------------------------------------------------------------------------------------------
    def block(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.restart is not None and module.mass_block_index < self.restart.block:  # type: ignore[attr-defined]
            return self.restart.output()
        return run_block(module, args, kwargs)

    def __post_init__(self) -> None:
        self._whole = len(self.groups) == 1 and self.groups[0].start == 0 and self.groups[0].stop == self.size

    # -- Linear ---------------------------------------------------------------------------------------------
    def _dense(self, tokens: int, st: Stacked, data: SetData, key: str, rank: int) -> bool:
        if self.strategy != "auto":
            return self.strategy == "dense"
        kept = None if self.kept is None else self.kept.peek((data.tasks, self.alpha))
        if kept is not None and key in kept:
            return True  # already formed: as cheap as the base's own matmul
        return use_dense(tokens, rank, st.Ut.shape[1], st.Vt.shape[1])

    def _dense_weight(self, base: torch.Tensor, st: Stacked, data: SetData, key: str) -> torch.Tensor:
        """The set's dense weight of ``key``: kept from an earlier batch, or formed now (and kept)."""
        kept = None if self.kept is None else self.kept.get((data.tasks, self.alpha))
        weight = None if kept is None else kept.get(key)
        if weight is None:
            rows = data.rows[key]
            weight = add_delta(base, (st.Ut[rows].T @ data.cores[key]) @ st.Vt[rows], self.alpha)
            if self.kept is not None:
                self.kept.get_or_make((data.tasks, self.alpha), dict)[key] = weight
        return weight

    def _side(self, x: torch.Tensor, st: Stacked, data: SetData, key: str) -> torch.Tensor:
        rows = data.rows[key]
        inner = (x.to(st.Vt.dtype) @ st.Vt[rows].T) @ (self.alpha * data.cores[key]).T
        return inner @ st.Ut[rows]

    def linear(self, module: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
        name = module.mass_name
        wkey, bkey = f"{name}.weight", f"{name}.bias"
        st = self.merger.stacked.get(wkey)
        if self._whole:
            data = self.groups[0].data
            bias = data.values.get(bkey, module.bias)
            rank = 0 if st is None else int(data.rows[wkey].numel())
            if rank == 0:
                return F.linear(x, module.weight, bias)
            if self._dense(x.numel() // x.shape[-1], st, data, wkey, rank):
                return F.linear(x, self._dense_weight(module.weight, st, data, wkey), bias)
            out = F.linear(x, module.weight, bias)
            return out.add_(self._side(x, st, data, wkey).to(out.dtype))
        return self._linear_groups(module, align_batch(x, self.size), st, wkey, bkey)

    def _linear_groups(self, module: RoutedLinear, x: torch.Tensor, st: Stacked | None, wkey: str, bkey: str
                       ) -> torch.Tensor:
        groups = self.groups
        per_sample = x[:1].numel() // x.shape[-1]
        split = 0  # leading (largest) groups that take a transient dense weight
        while st is not None and split < len(groups):
            rank = int(groups[split].data.rows[wkey].numel())
            if rank == 0 or not self._dense(groups[split].size * per_sample, st, groups[split].data, wkey, rank):
                break
            split += 1
        own_bias = any(bkey in g.data.values for g in groups)
        parts = [F.linear(x[g.start:g.stop], self._dense_weight(module.weight, st, g.data, wkey),
                          g.data.values.get(bkey, module.bias)) for g in groups[:split]]
        if split < len(groups):
            start = groups[split].start
            rest = F.linear(x[start:], module.weight, None if own_bias else module.bias)
            if st is not None:
                self._add_sides(rest, x[start:], groups[split:], st, wkey, start)
            if own_bias:
                rest.add_(_group_rows([g.data.values.get(bkey, module.bias) for g in groups[split:]],
                                      groups[split:], rest.ndim))
            parts.append(rest)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _add_sides(self, out: torch.Tensor, x: torch.Tensor, groups: Sequence[Group], st: Stacked, key: str,
                   offset: int) -> None:
        """``out[g] += alpha ((x_g V_S) C_S^T) U_S^T`` for every group, one bmm chain per run of groups of
        equal size and rank (why: on a shared CPU every small op is a parallel region that waits for
        descheduled threads; a few bmm beat many small matmuls)."""
        for run in _runs(groups, key):
            rank = int(run[0].data.rows[key].numel())
            if rank == 0:
                continue
            lo, hi = run[0].start - offset, run[-1].stop - offset
            rows = torch.stack([g.data.rows[key] for g in run])  # [G, K]
            cores = torch.stack([g.data.cores[key] for g in run]).transpose(1, 2)  # [G, K, K] (C^T)
            xs = x[lo:hi].reshape(len(run), -1, x.shape[-1]).to(st.Vt.dtype)
            inner = torch.bmm(torch.bmm(xs, st.Vt[rows].transpose(1, 2)), cores.mul_(self.alpha))
            target = out[lo:hi]
            if target.dtype == inner.dtype and target.is_contiguous():
                target.view(len(run), -1, target.shape[-1]).baddbmm_(inner, st.Ut[rows])
            else:
                target.add_(torch.bmm(inner, st.Ut[rows]).to(target.dtype).view(target.shape))

    # -- Embedding ------------------------------------------------------------------------------------------
    def embedding(self, module: RoutedEmbedding, ids: torch.Tensor) -> torch.Tensor:
        key = f"{module.mass_name}.weight"
        st = self.merger.stacked.get(key)
        if not self._whole:
            ids = align_batch(ids, self.size)
        out = F.embedding(ids, module.weight, module.padding_idx, module.max_norm, module.norm_type,
                          module.scale_grad_by_freq, module.sparse)
        if st is None:
            return out
        if self.strategy == "dense":
            return torch.cat([F.embedding(ids[g.start:g.stop] if not self._whole else ids,
                                          self._dense_weight(module.weight, st, g.data, key), module.padding_idx)
                              for g in self.groups])
        flat_ids = ids.reshape(-1)
        per_sample = ids[:1].numel() if ids.ndim else 1
        flat = out.view(-1, out.shape[-1])
        for g in self.groups:
            rows = g.data.rows[key]
            if rows.numel() == 0:
                continue
            lo, hi = (0, flat.shape[0]) if self._whole else (g.start * per_sample, g.stop * per_sample)
            # [tokens_g, K]: only the set's own U rows at the group's ids (gathering every task's rows of a
            # 30522-row table cost 30x more: the columns of Ut are strided)
            u = st.Ut[rows.unsqueeze(1), flat_ids[lo:hi].unsqueeze(0)].T
            flat[lo:hi] += ((u @ (self.alpha * g.data.cores[key])) @ st.Vt[rows]).to(out.dtype)
        return out

    # -- LayerNorm -----------------------------------------------------------------------------------------
    def layer_norm(self, module: RoutedLayerNorm, x: torch.Tensor) -> torch.Tensor:
        name = module.mass_name
        wkey, bkey = f"{name}.weight", f"{name}.bias"
        if self._whole:
            values = self.groups[0].data.values
            return F.layer_norm(x, module.normalized_shape, values.get(wkey, module.weight),
                                values.get(bkey, module.bias), module.eps)
        x = align_batch(x, self.size)
        out = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        if len(module.normalized_shape) != 1:  # rare: several normalized dims, apply per group
            for g in self.groups:
                part = out[g.start:g.stop]
                weight, bias = g.data.values.get(wkey, module.weight), g.data.values.get(bkey, module.bias)
                if weight is not None:
                    part.mul_(weight)
                if bias is not None:
                    part.add_(bias)
            return out
        if module.weight is not None:
            out.mul_(_group_rows([g.data.values.get(wkey, module.weight) for g in self.groups], self.groups, out.ndim))
        if module.bias is not None:
            out.add_(_group_rows([g.data.values.get(bkey, module.bias) for g in self.groups], self.groups, out.ndim))
        return out

    # -- generic owners -------------------------------------------------------------------------------------
    def _copy_for(self, module: nn.Module, data: SetData) -> nn.Module:
        owner = module.mass_name
        prefix = f"{owner}." if owner else ""
        params = dict(module.named_parameters(prefix=owner, remove_duplicate=False))
        values = {key: self.dense_value(key, params[key], data) for key in subtree_keys(self.generic_keys, owner)
                  if key in params}
        return shallow_copy(module, prefix, values, self.generic_keys)

    def generic(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._whole:
            return self._copy_for(module, self.groups[0].data)(*args, **kwargs)
        outputs = []
        for g in self.groups:
            sub_args = tuple(_rows_of(a, g, self.size) for a in args)
            sub_kwargs = {k: _rows_of(v, g, self.size) for k, v in kwargs.items()}
            restart = None if self.restart is None else self.restart.rows(slice(g.start, g.stop))
            narrowed = SecondPass([Group(0, g.size, g.data)], g.size, self.merger, self.alpha, self.generic_keys,
                                  self.dense_value, self.strategy, self.kept, restart)
            with active(narrowed):
                outputs.append(self._copy_for(module, g.data)(*sub_args, **sub_kwargs))
        return _concat(outputs)


def _runs(groups: Sequence[Group], key: str) -> list[list[Group]]:
    """Consecutive groups with the same sample count and rank of ``key``."""
    out: list[list[Group]] = []
    shape = None
    for group in groups:
        this = (group.size, int(group.data.rows[key].numel()))
        if out and this == shape:
            out[-1].append(group)
        else:
            out.append([group])
        shape = this
    return out


def _group_rows(values: Sequence[torch.Tensor], groups: Sequence[Group], ndim: int) -> torch.Tensor:
    """Per-group vectors ``[D]`` as per-sample rows that broadcast over an ``ndim`` output ``[B, 1.., D]``."""
    stacked = torch.stack(list(values))
    sizes = [g.size for g in groups]
    if any(size != 1 for size in sizes):
        stacked = stacked.repeat_interleave(torch.tensor(sizes, device=stacked.device), dim=0)
    return stacked.view(stacked.shape[0], *([1] * (ndim - 2)), stacked.shape[-1])


def _rows_of(value: Any, group: Group, size: int) -> Any:
    """A generic owner's argument cut to one group's rows (tensors with the batch on dim 0)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.ndim >= 1 and value.shape[0] == size:
        return value[group.start:group.stop]
    if value.ndim == 0 or value.shape[0] == 1:
        return value
    raise Unbatchable(f"a routed module got an argument of shape {list(value.shape)}; the batch has {size} samples")


def _concat(outputs: list[Any]) -> Any:
    """Per-group outputs of a generic owner joined along the batch (tensors, or tuples of tensors)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, tuple) and all(isinstance(item, torch.Tensor) for item in first):
        return tuple(torch.cat(items) for items in zip(*outputs))
    raise Unbatchable(f"a routed module returned {type(first).__name__}, which cannot be joined over groups")



__all__ = ["DENSE_OVERHEAD", "Group", "Plan", "SecondPass", "SetData", "align_batch", "use_dense"]
