"""The fast MASS path: same predictions as :class:`MASSModel`, without a dense model per task set.

Second pass. For a group of samples sharing a task set S the reference forms dense ``theta_0 + alpha * TSV-M(S)``
for every matrix and runs the model through ``functional_call``. Here the model keeps its base weights and
every factored ``nn.Linear`` / ``nn.Embedding`` gets the merged delta of S from the cached per-set factors
(:class:`~massmerge.mass.model.MergedFactors`), choosing per layer and per group the cheaper of

- a low-rank side branch ``y = x W_0^T + b_S + alpha * ((x V_S) * s_S) U_S^T`` (cost ``tokens * k (m + n)``), or
- a transient dense weight ``W_0 + alpha * U_S diag(s_S) V_S^T`` formed for this layer only and dropped right
  after (cost ``k m n``, the same operations as the reference, so bit-identical to it).

Small groups (few tokens) take the side branch, large ones the dense form; at no time does more than one
merged layer exist, and no per-set model is cached. Non-matrix deltas (biases, norms: small) are swapped in
with ``functional_call`` and cached per set; any other 2-D parameter (e.g. a class-token projection used
directly by its parent's code) is formed densely and swapped in the same way.

First pass. ``theta_0 + alpha * TSV-M(all)`` is materialized once, but only for the parameters of modules that
run before the routing layer (found by tracing one forward of the base): the layers after it are never reached
because the pass stops at the routing layer's input.

Mixed batches. With ``batched=True`` (default) a batch whose samples were routed to several task sets runs as
ONE forward (:mod:`massmerge.mass.batched`): the base matmul of every Linear once over all samples, each set's
low-rank delta as a side branch on its own rows. Models with parameter kinds that path cannot patch, or
seq-first models, fall back to the per-group path (one forward per set), which ``batched=False`` forces.

The reference path stays available: ``FastMASSModel(..., fast=False)`` or :meth:`reference_features_with`.
Neither path is thread-safe (both temporarily rebind module parameters / forwards during a call).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from massmerge.errors import OptionError
from massmerge.heads import select_by_max_logit
from massmerge.mass import batched as mixed
from massmerge.mass.model import (
    MERGED_SET_CACHE_SIZE,
    Batch,
    MASSModel,
    MASSOutput,
    MergedFactors,
    group_by_task_set,
    index_batch,
)
from massmerge.merging.common import tsv_merge_factors

Strategy = Literal["auto", "side", "dense"]
# Memory passes of forming a dense weight (matmul output, add, cast), counted in units of m*n flops.
DENSE_OVERHEAD = 3


def split_key(key: str) -> tuple[str, str]:
    """``'encoder.layer.0.attention.self.query.weight'`` -> (module name, parameter name)."""
    module, _, name = key.rpartition(".")
    return module, name


def use_dense(tokens: int, factors: MergedFactors, strategy: Strategy) -> bool:
    """Whether forming the dense merged weight is cheaper than the side branch for ``tokens`` input rows."""
    if strategy != "auto":
        return strategy == "dense"
    m, k = factors.U.shape
    n = factors.V.shape[0]
    return k * m * n + DENSE_OVERHEAD * m * n < tokens * k * (m + n)


def dense_weight(base: torch.Tensor, factors: MergedFactors, alpha: float) -> torch.Tensor:
    """``(W_0 + alpha * U diag(s) V^T)`` in the reference's exact order of operations, cast to W_0's dtype."""
    delta = factors.dense()
    compute = torch.promote_types(delta.dtype, torch.float32)
    return (base.to(compute) + alpha * delta.to(compute)).to(base.dtype)


def low_rank_side(x: torch.Tensor, factors: MergedFactors, alpha: float) -> torch.Tensor:
    """``alpha * ((x V) * s) U^T`` computed in the factors' dtype, returned in x's dtype."""
    compute = factors.U.dtype
    return ((x.to(compute) @ factors.V) * (alpha * factors.s)) @ factors.U.T


class FastMASSModel(MASSModel):
    """:class:`MASSModel` with the fast second pass and a first pass limited to the layers before routing.

    ``strategy``: ``auto`` (per layer and group, the cheaper of side branch and transient dense weight),
    ``side`` or ``dense`` (forced, for tests and benchmarks). ``fast=False`` runs the reference path.
    ``batched``: serve a batch of mixed task sets in one forward (default) instead of one forward per set;
    :attr:`batched_off_reason` says why a model cannot (then the per-group path runs).
    """

    def __init__(self, *args: Any, strategy: Strategy = "auto", fast: bool = True, batched: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if strategy not in ("auto", "side", "dense"):
            raise OptionError(f"strategy: unknown value '{strategy}' (choose auto, side or dense)")
        self.strategy: Strategy = strategy
        self.fast = fast
        self.batched = batched
        self._linear, self._embedding, self._other = self._classify_matrices()
        self.batched_off_reason: str | None = self._batched_off_reason()
        self._non_matrix_cache: OrderedDict[tuple[int, ...], dict[str, torch.Tensor]] = OrderedDict()
        self._first_pass_keys: set[str] | None = None

    @classmethod
    def from_model(cls, model: MASSModel, **options: Any) -> "FastMASSModel":
        """The fast model over the same base, factors, heads, config and pooling as ``model``."""
        return cls(model.model, model.factors, list(model.heads), model.config, pool=model.pool,
                   features=model.runner.features, **options)

    def _classify_matrices(self) -> tuple[dict[str, nn.Linear], dict[str, nn.Embedding], list[str]]:
        """Sort factored keys by how the fast pass applies them: Linear side branch, Embedding side, dense."""
        modules = dict(self.model.named_modules())
        linear: dict[str, nn.Linear] = {}
        embedding: dict[str, nn.Embedding] = {}
        other: list[str] = []
        for key in self.factors.matrices:
            owner, name = split_key(key)
            module = modules.get(owner)
            if name == "weight" and type(module) is nn.Linear:
                linear[key] = module
            elif name == "weight" and type(module) is nn.Embedding and module.max_norm is None:
                embedding[key] = module
            else:
                other.append(key)
        return linear, embedding, other

    # ----- first pass -------------------------------------------------------------------------------------

    def routing_activation(self, batch: Batch, *, early_exit: bool = True) -> torch.Tensor:
        """As the reference, after learning (once) which parameters the pass reaches before the routing layer."""
        if self.fast and self._first_pass_keys is None:
            self._first_pass_keys = self._trace_first_pass_keys(batch)
            self._first_pass_params = None
        return super().routing_activation(batch, early_exit=early_exit)

    def first_pass_params(self) -> dict[str, torch.Tensor]:
        """``theta_0 + alpha * TSV-M(all)`` (de-redundant) for the parameters used before the routing layer."""
        if not self.fast or self._first_pass_keys is None:
            return super().first_pass_params()
        if self._first_pass_params is None:
            self._first_pass_params = self._params_from_delta(self._first_pass_delta(self._first_pass_keys))
        return self._first_pass_params

    def _first_pass_delta(self, keys: set[str]) -> dict[str, torch.Tensor]:
        every = range(self.factors.num_tasks)
        delta: dict[str, torch.Tensor] = {}
        for key, per_task in self.factors.matrices.items():
            if key in keys:
                chosen = [t for t in every if t in self.factors.accepted[key]] or list(every)
                delta[key] = tsv_merge_factors([per_task[t] for t in chosen])
        for key, per_task in self.factors.non_matrix.items():
            if key in keys:
                delta[key] = torch.stack(list(per_task)).mean(dim=0)
        return delta

    def _trace_first_pass_keys(self, batch: Batch) -> set[str]:
        """Keys owned by modules called before the routing layer, or by modules the forward never calls.

        Why the second group: a parameter whose module is never called is used directly by some parent's code,
        possibly before the routing layer, so it is kept to stay exact.
        """
        order: dict[str, int] = {}
        routing_at: list[int] = []
        handles = []
        for name, module in self.model.named_modules():
            def record(_m: nn.Module, _args: Any, name: str = name) -> None:
                order.setdefault(name, len(order))
                if name == self.config.routing_layer and not routing_at:
                    routing_at.append(order[name])
            handles.append(module.register_forward_pre_hook(record))
        try:
            with torch.no_grad():
                self._call({}, batch)
        finally:
            for handle in handles:
                handle.remove()
        limit = routing_at[0] if routing_at else len(order)
        keys = set()
        for key in [*self.factors.matrices, *self.factors.non_matrix]:
            owner = split_key(key)[0]
            if owner not in order or order[owner] <= limit:
                keys.add(key)
        return keys

    # ----- second pass ------------------------------------------------------------------------------------

    def features_with(self, tasks: tuple[int, ...], batch: Batch) -> torch.Tensor:
        """Final features under ``theta_0 + alpha * TSV-M(tasks)``, by the fast path unless ``fast`` is off."""
        if not self.fast:
            return self.reference_features_with(tasks, batch)
        merged = self.merged_set(tasks)
        params = dict(self._non_matrix_params(tasks))
        for key in self._other:
            params[key] = dense_weight(self._base_state[key], merged[key], self.config.alpha)
        with self._patched(merged):
            return self._call(params, batch)

    def reference_features_with(self, tasks: tuple[int, ...], batch: Batch) -> torch.Tensor:
        """The straightforward path: every merged matrix formed densely (kept for tests)."""
        return MASSModel.features_with(self, tasks, batch)

    def _non_matrix_params(self, tasks: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """``theta_0 + alpha * mean delta`` of the non-matrix keys for a set, cached (LRU) by the set."""
        cache = self._non_matrix_cache
        if tasks in cache:
            cache.move_to_end(tasks)
            return cache[tasks]
        delta = {key: torch.stack([per_task[t] for t in tasks]).mean(dim=0)
                 for key, per_task in self.factors.non_matrix.items()}
        cache[tasks] = self._params_from_delta(delta)
        if len(cache) > MERGED_SET_CACHE_SIZE:
            cache.popitem(last=False)
        return cache[tasks]

    @contextmanager
    def _patched(self, merged: Mapping[str, MergedFactors]) -> Iterator[None]:
        """Rebind ``forward`` of each factored Linear/Embedding to add the set's merged delta; always undone."""
        patched: list[nn.Module] = []
        try:
            for key, module in self._linear.items():
                module.forward = self._linear_forward(module, merged[key])  # type: ignore[method-assign]
                patched.append(module)
            for key, module in self._embedding.items():
                module.forward = self._embedding_forward(module, merged[key])  # type: ignore[method-assign]
                patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward

    def _linear_forward(self, module: nn.Linear, factors: MergedFactors) -> Any:
        alpha, strategy = self.config.alpha, self.strategy

        def forward(x: torch.Tensor) -> torch.Tensor:
            weight = module.weight  # the base weight: functional_call swaps only non-matrix keys
            if use_dense(x.numel() // x.shape[-1], factors, strategy):
                return F.linear(x, dense_weight(weight, factors, alpha), module.bias)
            out = F.linear(x, weight, module.bias)
            return out + low_rank_side(x, factors, alpha).to(out.dtype)

        return forward

    def _embedding_forward(self, module: nn.Embedding, factors: MergedFactors) -> Any:
        """Rows of ``W_0 + alpha U diag(s) V^T`` looked up as ``W_0[ids] + alpha (U[ids] * s) V^T``."""
        alpha, strategy = self.config.alpha, self.strategy

        def forward(ids: torch.Tensor) -> torch.Tensor:
            if strategy == "dense":
                weight = dense_weight(module.weight, factors, alpha)
            else:
                weight = module.weight
            out = F.embedding(ids, weight, module.padding_idx, None, 2.0, module.scale_grad_by_freq, module.sparse)
            if strategy == "dense":
                return out
            rows = F.embedding(ids, factors.U)
            return out + (((rows * (alpha * factors.s)) @ factors.V.T)).to(out.dtype)

        return forward

    # ----- mixed batches in one forward ----------------------------------------------------------------------

    def _batched_off_reason(self) -> str | None:
        """Why mixed batches cannot run in one forward on this model (None: they can)."""
        owners = dict(self.model.named_modules())
        key = mixed.unsupported_owner(owners, [*self.factors.matrices, *self.factors.non_matrix])
        if key is not None:
            return f"factored parameter '{key}' is not owned by an nn.Linear, nn.Embedding or nn.LayerNorm"
        return mixed.check_batch_first(self.model)

    def _second_pass(self, batch: Batch, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward for all sets when possible; else (or with one set) the per-group path."""
        groups = group_by_task_set(selected)
        if not (self.fast and self.batched) or self.batched_off_reason or len(groups) < 2:
            return super()._second_pass(batch, selected)
        try:
            feats = self._mixed_features(batch, groups)
        except mixed.Unbatchable as error:
            self.batched_off_reason = str(error)  # the model's layout does not change between batches
            return super()._second_pass(batch, selected)
        task = torch.empty(selected.shape[0], dtype=torch.long)
        label = torch.empty(selected.shape[0], dtype=torch.long)
        for tasks, index in groups:
            winner, labels = select_by_max_logit([self.heads[t](feats[index]) for t in tasks])
            task[index] = torch.tensor(tasks)[winner]
            label[index] = labels
        return task, label

    def mixed_features(self, batch: Batch, selected: torch.Tensor) -> torch.Tensor:
        """Final features [B, ...], sample i under ``theta_0 + alpha * TSV-M(S_i)``, in one batched forward.

        Raises :class:`~massmerge.mass.batched.Unbatchable` where the model needs the per-group path.
        """
        if self.batched_off_reason:
            raise mixed.Unbatchable(self.batched_off_reason)
        return self._mixed_features(batch, group_by_task_set(selected))

    def _mixed_features(self, batch: Batch, groups: list[tuple[tuple[int, ...], torch.Tensor]]) -> torch.Tensor:
        plan = mixed.Plan.of(groups)
        spans = [mixed.Group(start, stop, self.merged_set(tasks), self._non_matrix_params(tasks))
                 for tasks, start, stop in plan.sets]
        with mixed.patched_forwards(self._mixed_forwards(spans)):
            return plan.unpermute(self.runner(index_batch(batch, plan.order)))

    def _mixed_forwards(self, groups: list[mixed.Group]) -> dict[nn.Module, Any]:
        """The batched forward of every module that owns a factored parameter, for these groups."""
        alpha, strategy = self.config.alpha, self.strategy
        modules = dict(self.model.named_modules())

        def choose(tokens: int, factors: MergedFactors) -> bool:
            return use_dense(tokens, factors, strategy)

        def dense(weight: torch.Tensor, factors: MergedFactors) -> torch.Tensor:
            return dense_weight(weight, factors, alpha)

        forwards: dict[nn.Module, Any] = {}
        for key, module in self._linear.items():
            forwards[module] = mixed.linear_forward(module, key, groups, alpha, choose, dense)
        for key, module in self._embedding.items():
            forwards[module] = mixed.embedding_forward(module, key, groups, alpha,
                                                       dense if strategy == "dense" else None)
        for key in self.factors.non_matrix:
            owner = split_key(key)[0]
            module = modules[owner]
            if module not in forwards and type(module) is nn.LayerNorm:
                forwards[module] = mixed.layer_norm_forward(module, owner, groups)
            elif module not in forwards:  # a Linear whose bias alone changes: a rank-0 matrix delta
                forwards[module] = mixed.linear_forward(module, f"{owner}.weight", groups, alpha, choose, dense)
        return forwards

    # ----- explicit task sets (benchmarks, serving with known sets) -----------------------------------------

    @torch.no_grad()
    def forward_with_sets(self, batch: Batch, selected: torch.Tensor) -> MASSOutput:
        """Run both passes like :meth:`forward` but serve each sample with the given task set ``selected``.

        The first pass still runs (its probabilities are returned), so the cost equals a routed forward; used
        by the benchmarks to control how mixed a batch is.
        """
        res, probs, _ = self.route(batch)
        if selected.shape != probs.shape:
            raise OptionError(f"selected: shape {list(selected.shape)} does not match [B, T] = {list(probs.shape)}")
        task, label = self._second_pass(batch, selected.bool())
        return MASSOutput(task, label, probs, selected.bool(), res)


def num_groups(selected: torch.Tensor) -> int:
    """Number of distinct task sets in a batch (one second-pass call each)."""
    return len(group_by_task_set(selected))


__all__ = ["FastMASSModel", "Strategy", "num_groups"]
