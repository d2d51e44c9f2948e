"""The MASS model: the one object that serves, evaluates and benchmarks MASS (design.md section 2).

1. First pass: ``theta_0 + alpha * TSV-M(all tasks, de-redundant)`` up to the routing layers only; their inputs
   are pooled into z and the forward stops there.
2. Router: projection residuals of z against each task's right singular vectors, combined over the routing
   layers, standardized and softmaxed; the eta / K rule picks each sample's task set S (:mod:`.router`).
3. Second pass: every sample runs ``theta_0 + alpha * TSV-M(S)``, by one of three strategies:

   - ``batched``: the whole batch in ONE forward, each set's low-rank side branch on its own rows;
   - ``grouped``: one forward per task set (any token layout, any parameter kind);
   - ``reference``: per set, every weight formed densely from the exact SVD polar factors and swapped in with
     ``functional_call``; the slow, independent path the tests compare the others with.

   ``auto`` (the default) runs ``batched`` and falls back to ``grouped`` when the model cannot (a
   sequence-first module, or a routed module whose inputs do not carry the batch on dim 0); the reason is kept
   in :attr:`MASSModel.batched_off_reason`. ``reference`` is never chosen automatically.
4. Heads: every selected task's head on the final features; the head rule picks (task, class).

Routed modules are installed into the base model once, in place (:mod:`.routed`); they compute the base model
exactly when no MASS call is running, and each call's state lives in a per-thread context, so two threads may
call one model at once. Task sets' merges come from the stored factors with no SVD (:mod:`.setmerge`) and are
cached across calls, keyed by the set and alpha. Serve settings can change per view (:meth:`with_settings`)
without repeating any of that work.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from massmerge.device import resolve_device, to_device
from massmerge.errors import OptionError
from massmerge.heads.rules import choose
from massmerge.mass import router
from massmerge.mass.config import ServeSettings, make_serve_settings
from massmerge.mass.experts import ExpertFactors
from massmerge.mass.lru import LRU
from massmerge.mass.pooling import PoolFn, batch_size_of, identity_pool
from massmerge.mass.first_pass import FirstPass
from massmerge.mass.restart import RestartState, batch_tokens, block_hidden, join_rows, split_rows
from massmerge.mass.routed import Pass, StopForward, Unbatchable, active, install, install_blocks, run_block
from massmerge.mass.second_pass import Group, Plan, SecondPass, SetData
from massmerge.mass.setmerge import SetMerger, TaskSet
from massmerge.task_vectors import add_delta

FeatureFn = Callable[[nn.Module, Any], torch.Tensor]
Batch = Any
Strategy = Literal["auto", "batched", "grouped", "reference"]
STRATEGIES = ("auto", "batched", "grouped", "reference")
SET_CACHE_SIZE = 256  # merged non-matrix values per (set, alpha); small tensors (biases, norms)
DENSE_SETS_KEPT = 1  # task sets whose dense merged matrices are kept for their next batches (each: one copy
# of the factored matrices; serving sends a set's batches one after another, so one is enough)


def default_features(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Call the model on the batch (a tensor, or a dict of keyword tensors) and expect a [B, d] tensor."""
    out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    if not isinstance(out, torch.Tensor):
        raise TypeError("the model does not return a tensor; pass features=... to pick its final features")
    return out


def index_batch(batch: Batch, index: torch.Tensor) -> Batch:
    """The samples ``index`` of a tensor batch or of every per-sample tensor in a dict batch."""
    if isinstance(batch, torch.Tensor):
        return batch[index]
    size = batch_size_of(batch)
    return {key: value[index] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == size else value
            for key, value in batch.items()}


def group_by_task_set(selected: torch.Tensor) -> list[tuple[TaskSet, torch.Tensor]]:
    """Sample indices grouped by their selected task set (sets in sorted order)."""
    groups: dict[TaskSet, list[int]] = {}
    for row, mask in enumerate(selected.tolist()):
        groups.setdefault(tuple(i for i, on in enumerate(mask) if on), []).append(row)
    return [(tasks, torch.tensor(rows, dtype=torch.long, device=selected.device))
            for tasks, rows in sorted(groups.items())]


@dataclass
class MASSOutput:
    """Predictions for a batch: the chosen task and class, and how the router saw each sample."""

    task: torch.Tensor  # [B] long, index into task_names
    label: torch.Tensor  # [B] long, class index in that task's label space
    probs: torch.Tensor  # [B, T] router probabilities (one-hot when the task is given)
    selected: torch.Tensor  # [B, T] bool, the task set S of each sample
    residuals: dict[str, torch.Tensor] | None  # routing layer -> [B, T] residuals (None when the task is given)
    features: torch.Tensor | None = None  # [B, d] second-pass features (when asked for)


@dataclass
class Routing:
    """The router's view of a batch (and, with ``restart_block``, each sample's first-pass hidden states at the
    restart block, for its second pass: :mod:`massmerge.mass.restart`)."""

    residuals: dict[str, torch.Tensor]
    probs: torch.Tensor
    selected: torch.Tensor
    restart: list[torch.Tensor] | None = None


class StageClock:
    """Wall seconds of each stage of the served path, each stage's own time (a stage inside another is taken out
    of the outer one): ``first pass + router``, ``set merges`` (a new task set's cores and values) and
    ``second pass + heads``. For one caller at a time (a benchmark), through :meth:`MASSModel.timed`."""

    STAGES = ("first pass + router", "set merges", "second pass + heads")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self._inner: list[float] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.seconds[name] += spent - self._inner.pop()
            if self._inner:
                self._inner[-1] += spent


class FeatureRunner(nn.Module):
    """``features(model, batch)`` as a module, so ``functional_call`` can swap the model's parameters (the
    reference path here; static weights in :mod:`massmerge.experiments.runner`)."""

    def __init__(self, model: nn.Module, features: FeatureFn) -> None:
        super().__init__()
        self.model = model
        self.features = features

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.features(self.model, batch)


class _Shared:
    """Everything a MASS model's views share: the base, factors, set merges and the caches over them."""

    def __init__(self, model: nn.Module, factors: ExpertFactors, features: FeatureFn) -> None:
        self.runner = FeatureRunner(model, features)
        self.factors = factors
        self.merger = SetMerger(factors)
        self.base = {key: value.detach() for key, value in model.state_dict(keep_vars=True).items()}
        floating = next((v for v in self.base.values() if v.is_floating_point()), None)
        self.device = floating.device if floating is not None else torch.device("cpu")
        self.dtype = floating.dtype if floating is not None else torch.float32
        self.matrix_keys = frozenset(factors.matrices)
        self.non_matrix_keys = frozenset(factors.non_matrix)
        self.installed = install(model, [*factors.matrices, *factors.non_matrix], [])
        self.batched_off_reason = _seq_first_module(model)
        self._first: dict[float, dict[str, torch.Tensor]] = {}
        self._sets: LRU[tuple[TaskSet, float], SetData] = LRU(SET_CACHE_SIZE)
        self.kept: LRU[tuple[TaskSet, float], dict[str, torch.Tensor]] = LRU(DENSE_SETS_KEPT)
        self._first_lock = threading.Lock()
        self._reference_lock = threading.Lock()
        self.clock: StageClock | None = None  # set for a timed block (MASSModel.timed)
        self.blocks: tuple[str, ...] = ()  # the transformer blocks' names, in forward order (restart_block)
        self.block_output_length: int | None = None  # blocks return a tensor (None) or a tuple of this length

    def stage(self, name: str) -> AbstractContextManager[None]:
        """Time the block as stage ``name`` when a clock is running (a no-op otherwise)."""
        return nullcontext() if self.clock is None else self.clock.stage(name)

    # -- first pass ----------------------------------------------------------------------------------------
    def first_pass_value(self, alpha: float) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """(key, base tensor) -> ``theta_0 + alpha * TSV-M(all, de-redundant)`` of that key, made once."""
        with self._first_lock:
            cache = self._first.setdefault(alpha, {})

        def value(key: str, base: torch.Tensor) -> torch.Tensor:
            if key not in self.matrix_keys and key not in self.non_matrix_keys:
                return base
            found = cache.get(key)
            if found is not None:
                return found
            with self._first_lock:
                if key not in cache:
                    cache[key] = self._first_pass_tensor(key, alpha)
                return cache[key]

        return value

    def _first_pass_tensor(self, key: str, alpha: float) -> torch.Tensor:
        base = self.base[key]
        if key in self.matrix_keys:
            tasks = self.merger.first_pass_tasks(key)
            core = self.merger.compute_cores(tasks, [key])[key]
            return add_delta(base, self.merger.dense_delta(key, tasks, core), alpha)
        return add_delta(base, torch.stack(list(self.factors.non_matrix[key])).mean(dim=0), alpha)

    # -- task sets -------------------------------------------------------------------------------------------
    def set_data(self, tasks: TaskSet, alpha: float) -> SetData:
        """The merged parameters of a task set (cores and rows per matrix, values per other key), cached."""
        return self._sets.get_or_make((tasks, alpha), lambda: self._timed_set_data(tasks, alpha))

    def _timed_set_data(self, tasks: TaskSet, alpha: float) -> SetData:
        with self.stage("set merges"):
            return self._make_set_data(tasks, alpha)

    def _make_set_data(self, tasks: TaskSet, alpha: float) -> SetData:
        cores = self.merger.cores(tasks)
        rows = {key: st.rows(tasks) for key, st in self.merger.stacked.items()}
        values = {key: add_delta(self.base[key], torch.stack([per_task[t] for t in tasks]).mean(dim=0), alpha)
                  for key, per_task in self.factors.non_matrix.items()}
        return SetData(tasks, rows, cores, values)

    def dense_value(self, alpha: float) -> Callable[[str, torch.Tensor, SetData], torch.Tensor]:
        """(key, base, set) -> the set's dense parameter, for generic owners (formed per call, not cached)."""

        def value(key: str, base: torch.Tensor, data: SetData) -> torch.Tensor:
            if key in data.values:
                return data.values[key]
            if key in self.matrix_keys:
                delta = self.merger.dense_delta(key, data.tasks, data.cores[key])
                return add_delta(base, delta, alpha)
            return base

        return value


def _seq_first_module(model: nn.Module) -> str | None:
    """Why one forward cannot hold several task sets: a module that declares ``batch_first=False``."""
    for name, module in model.named_modules():
        if getattr(module, "batch_first", True) is False:
            return f"module '{name or type(module).__name__}' is sequence-first (batch_first=False)"
    return None


def check_restart(blocks: Sequence[str], settings: ServeSettings) -> None:
    """``restart_block`` names a block the first pass reaches: at most the block of the deepest routing layer
    (the first pass stops there), and the model's blocks must be known (an adapter's, or ``blocks=``)."""
    j = settings.restart_block
    if not j:
        return
    if not blocks:
        raise OptionError("--restart-block: the model's transformer blocks are unknown (load an adapter artifact, "
                          "or pass blocks=[...] with the block modules' names)")
    deepest = settings.routing_layers[-1]
    routing_block = next((i for i, name in enumerate(blocks) if deepest.startswith(name + ".")), None)
    if routing_block is None:
        raise OptionError(f"--restart-block: the routing layer '{deepest}' is in none of the model's blocks")
    if j > routing_block:
        raise OptionError(f"--restart-block {j}: the first pass stops in block {routing_block} (routing layer "
                          f"'{deepest}'), so the second pass can restart at block {routing_block} at the latest")


class ReferencePass(Pass):
    """The reference path's only pass: plain modules (its weights are swapped in by ``functional_call``), the
    blocks before the restart block skipped as the served second pass skips them."""

    def __init__(self, restart: RestartState) -> None:
        self.restart = restart

    def linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, module.weight, module.bias)

    def embedding(self, module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, module.weight, module.padding_idx, module.max_norm, module.norm_type,
                           module.scale_grad_by_freq, module.sparse)

    def layer_norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)

    def generic(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return module.mass_plain.forward(module, *args, **kwargs)  # type: ignore[attr-defined]

    def block(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if module.mass_block_index < self.restart.block:  # type: ignore[attr-defined]
            return self.restart.output()
        return run_block(module, args, kwargs)


def place(base_model: nn.Module, factors: ExpertFactors, heads: nn.Module, device: torch.device | str | None,
          dtype: torch.dtype | None) -> None:
    """Move a MASS model's parts, in place, to ``device`` and the base to the serving ``dtype``.

    The factors follow in float16 for float16 serving and stay float32 otherwise: bfloat16's 8-bit mantissa
    is too coarse for the router, whose residuals differ across tasks by a few percent (on the toy model of the
    tests it misrouted 4% of inputs against 0% with float32 factors). Heads keep their float32 weights (their
    logits are compared across tasks)."""
    device = resolve_device(device) if device is not None else None
    base_model.to(device=device, dtype=dtype)
    factors.to(device, torch.float16 if dtype == torch.float16 else torch.float32 if dtype is not None else None)
    heads.to(device=device)


def check_parts(base_model: nn.Module, factors: ExpertFactors, heads: Sequence[nn.Module],
                settings: ServeSettings) -> None:
    """What a MASS model needs of its parts (routing layers that are ``nn.Linear`` modules of the model, a head
    per task, factor keys that are the model's parameters), checked before any work: ``MASSModel`` runs it,
    and ``massmerge build``, which writes an artifact from the parts without serving them."""
    layers = settings.routing_layers
    if not layers:
        raise OptionError("--routing-layer: no routing layer given (name the nn.Linear whose input routes)")
    names = dict(base_model.named_modules())
    for layer in layers:
        if layer not in names:
            linear = [n for n, m in names.items() if isinstance(m, nn.Linear)][:3]
            raise OptionError(f"--routing-layer '{layer}' is not a module of the model (e.g. {linear})")
        if not isinstance(names[layer], nn.Linear):
            raise OptionError(f"--routing-layer '{layer}' is a {type(names[layer]).__name__}, not an nn.Linear")
        factors.routing_basis(f"{layer}.weight")  # names the layer if it has no task factors
    if len(heads) != factors.num_tasks:
        raise OptionError(f"--heads: {len(heads)} heads for {factors.num_tasks} tasks")
    state_keys = set(base_model.state_dict())
    missing = [k for k in [*factors.matrices, *factors.non_matrix] if k not in state_keys]
    if missing:
        raise OptionError(f"task factor key '{missing[0]}' is not a parameter of the model")


class MASSModel(nn.Module):
    """MASS over any model whose routing layers are ``nn.Linear`` modules named in ``settings.routing_layers``.

    ``factors`` keys must be names in ``base_model.state_dict()``; ``heads[t]`` maps final features to task t's
    logits (``class_names[t]``, when given, names its classes in predictions). ``pool(activation, batch, pooling)`` makes z from a routing layer's input; ``features(model,
    batch)`` runs the model to its final features. Serve settings come from ``settings`` and keyword
    overrides (``routing_layers=``, ``eta=``, ...). ``strategy``: see the module docstring.

    The base model is modified in place once: its factored modules become routed modules (same parameters,
    same names, the same outputs outside MASS calls). The factors are re-stored once, stacked per matrix.
    """

    manifest: Any = None  # the artifact's manifest when the model came from ``load()``
    adapter: Any = None  # the bound model-family adapter when the model came from ``load()`` of an adapter artifact

    def __init__(self, base_model: nn.Module, factors: ExpertFactors, heads: Sequence[nn.Module],
                 settings: ServeSettings | None = None, *, pool: PoolFn = identity_pool,
                 features: FeatureFn = default_features, strategy: Strategy = "auto",
                 class_names: Sequence[Sequence[str] | None] | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, blocks: Sequence[str] | None = None, **overrides: Any) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise OptionError(f"strategy: unknown value '{strategy}' (choose {', '.join(STRATEGIES)})")
        self.settings = (settings or make_serve_settings()).updated(**overrides)
        self.heads = nn.ModuleList(heads)
        dtype = dtype or (getattr(torch, self.settings.dtype) if self.settings.dtype else None)
        if device is not None or dtype is not None:
            place(base_model, factors, self.heads, device, dtype)
        self.class_names = None if class_names is None else [None if c is None else list(c) for c in class_names]
        self.pool = pool
        self.strategy: Strategy = strategy
        check_parts(base_model, factors, self.heads, self.settings)
        self._shared = _Shared(base_model.eval(), factors, features)
        self._bases = {layer: self._routing_basis(layer) for layer in self.settings.routing_layers}
        self._bank = router.RoutingBank(self._bases)
        install(base_model, [], self.settings.routing_layers)
        self._shared.blocks = tuple(blocks or ())
        install_blocks(base_model, self._shared.blocks)
        check_restart(self._shared.blocks, self.settings)

    def _routing_basis(self, layer: str) -> router.LayerBases:
        stacked = self._shared.merger.stacked[f"{layer}.weight"]  # check_parts: it has factors
        return router.LayerBases.of_rows(stacked.Vt, stacked.offsets)  # views of the stacked factors

    # -- views -------------------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._shared.runner.model

    @property
    def factors(self) -> ExpertFactors:
        return self._shared.factors

    @property
    def task_names(self) -> list[str]:
        return self._shared.factors.task_names

    @property
    def batched_off_reason(self) -> str | None:
        """Why mixed batches run one forward per task set on this model (None: they run in one forward)."""
        return self._shared.batched_off_reason

    @property
    def device(self) -> torch.device:
        """Where the model runs: the device of its base's parameters."""
        return self._shared.device

    @property
    def dtype(self) -> torch.dtype:
        """The precision the model runs in: the dtype of its base's floating parameters."""
        return self._shared.dtype

    def inputs(self, batch: Batch) -> Batch:
        """A batch on the model's device, its floating tensors (pixels) in the model's dtype; token ids and
        masks keep theirs. Every entry point calls it, so callers may pass CPU batches."""
        return to_device(batch, self.device, self.dtype)

    @contextmanager
    def timed(self) -> Iterator[dict[str, float]]:
        """Wall seconds per stage of every call in the block (:class:`StageClock`), in the yielded dict, which is
        filled as the block runs. For benchmarks: one caller at a time; views share the clock."""
        clock = StageClock()
        self._shared.clock = clock
        try:
            yield clock.seconds
        finally:
            self._shared.clock = None

    def with_settings(self, settings: ServeSettings | None = None, *, strategy: Strategy | None = None,
                      **overrides: Any) -> MASSModel:
        """A view with other serve settings (e.g. ``eta=0.1``), sharing the base, factors and caches."""
        view = copy.copy(self)
        view.settings = (settings or self.settings).updated(**overrides)
        if view.settings.dtype not in (None, self.settings.dtype) and getattr(torch, view.settings.dtype) != self.dtype:
            raise OptionError(f"--dtype: a view shares its model's weights, which are {self.dtype}; load the "
                              f"artifact again with dtype='{view.settings.dtype}'")
        if strategy is not None:
            if strategy not in STRATEGIES:
                raise OptionError(f"strategy: unknown value '{strategy}' (choose {', '.join(STRATEGIES)})")
            view.strategy = strategy
        check_parts(self.model, self.factors, view.heads, view.settings)
        check_restart(self._shared.blocks, view.settings)
        view._bases = {layer: self._bases.get(layer) or self._routing_basis(layer)
                       for layer in view.settings.routing_layers}
        if list(view._bases) != list(self._bases):
            view._bank = router.RoutingBank(view._bases)
        install(self.model, [], view.settings.routing_layers)
        return view

    # -- first pass and router -------------------------------------------------------------------------------
    def first_pass_state(self) -> dict[str, torch.Tensor]:
        """``theta_0 + alpha * TSV-M(all, de-redundant)`` of every factored key (a forward forms only the keys
        it reaches; this forms them all, e.g. for a plain model of the first pass)."""
        value = self._shared.first_pass_value(self.settings.alpha)
        keys = [*self.factors.matrices, *self.factors.non_matrix]
        return {key: value(key, self._shared.base[key]) for key in keys}

    def routing_activations(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Each routing layer's input [B, L, d] (or [B, d]) under the first-pass weights; stops at the last."""
        return self._first_pass(batch).captured

    def _first_pass(self, batch: Batch) -> FirstPass:
        layers, restart = self.settings.routing_layers, self.settings.restart_block
        first = FirstPass(self._first_pass_weights(), layers,
                          self._shared.installed.generic_keys, record_block=restart - 1 if restart else None)
        with active(first):
            try:
                self._shared.runner(self.inputs(batch))
            except StopForward:
                pass
        missing = [layer for layer in layers if layer not in first.captured]
        if missing:
            raise OptionError(f"--routing-layer '{missing[0]}' was never called in the forward pass")
        return first

    def _first_pass_weights(self) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """(key, base tensor) -> the first pass's tensor: TSV-M of all tasks, or the base itself (proj-PRE)."""
        if self.settings.first_pass == "pretrained":
            return lambda key, base: base
        return self._shared.first_pass_value(self.settings.alpha)

    @torch.no_grad()
    def layer_residuals(self, batch: Batch) -> dict[str, torch.Tensor]:
        """[B, T] projection residuals of every routing layer, pooled as the settings say (``tokens``: the RMS of
        each content token's residual), from one first pass."""
        return self._layer_residuals(self.inputs(batch), self._first_pass(batch))

    def _layer_residuals(self, batch: Batch, first: FirstPass) -> dict[str, torch.Tensor]:
        s, captured = self.settings, first.captured
        pooled_by_input: dict[int, Any] = {}  # layers that read one tensor (query, key, value) pool it once
        pooled = {}
        for layer in s.routing_layers:
            activation = captured[layer]
            if id(activation) not in pooled_by_input:
                pooled_by_input[id(activation)] = self.pool(activation, batch, s.pooling)
            pooled[layer] = pooled_by_input[id(activation)]
        if any(isinstance(value, tuple) for value in pooled.values()):  # tokens: per-token residuals, per layer
            return {layer: router.token_residuals(*pooled[layer], self._bases[layer]) for layer in s.routing_layers}
        residuals = self._bank.residuals(pooled)
        return {layer: residuals[layer] for layer in s.routing_layers}

    @torch.no_grad()
    def route(self, batch: Batch) -> Routing:
        """Residuals per routing layer, probabilities and selected task sets of a batch."""
        with self._shared.stage("first pass + router"):
            return self._route(batch)

    def _route(self, batch: Batch) -> Routing:
        s, batch = self.settings, self.inputs(batch)
        first = self._first_pass(batch)
        residuals = self._layer_residuals(batch, first)
        free = [self._bases[layer].dim - self._bases[layer].mean_rank for layer in s.routing_layers]
        probs, selected = router.route(list(residuals.values()), combine=s.layer_combine, free_dims=free,
                                       mode=s.mode, eta=s.eta, top_k=s.top_k, tau=s.tau)
        restart = None
        if s.restart_block:
            hidden, self._shared.block_output_length = block_hidden(first.recorded)
            restart = split_rows(hidden, batch)
        return Routing(residuals, probs, selected, restart)

    # -- second pass -----------------------------------------------------------------------------------------
    def features_with(self, tasks: Sequence[int], batch: Batch) -> torch.Tensor:
        """Final features of every sample of ``batch`` under ``theta_0 + alpha * TSV-M(tasks)``."""
        index = torch.arange(batch_size_of(batch), device=self.device)
        return self.second_pass_features(batch, [(tuple(sorted(tasks)), index)])

    @torch.no_grad()
    def second_pass_features(self, batch: Batch, groups: list[tuple[TaskSet, torch.Tensor]],
                             restart: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Features [B, d]: sample i under its group's set, by this model's strategy (module doc). ``restart``:
        each sample's first-pass hidden states (``Routing.restart``) when ``restart_block`` is set; without
        them the second pass runs from the embeddings."""
        with self._shared.stage("second pass + heads"):
            batch = self.inputs(batch)
            state = None
            if restart is not None and self.settings.restart_block:
                hidden = join_rows(restart, batch, batch_tokens(batch, restart))
                state = RestartState(self.settings.restart_block, hidden, self._shared.block_output_length)
            return self._second_pass_features(batch, groups, state)

    def _second_pass_features(self, batch: Batch, groups: list[tuple[TaskSet, torch.Tensor]],
                              restart: RestartState | None) -> torch.Tensor:
        if self.strategy == "reference":
            return self._per_group(batch, groups, restart, self._reference_features)
        if len(groups) > 1 and self.strategy in ("auto", "batched") and not self._shared.batched_off_reason:
            try:
                return self._batched_features(batch, groups, restart)
            except Unbatchable as why:
                self._shared.batched_off_reason = str(why)  # a model's layout does not change between batches
        if self.strategy == "batched" and len(groups) > 1:
            raise OptionError(f"strategy batched: this model cannot run mixed task sets in one forward "
                              f"({self._shared.batched_off_reason})")
        return self._per_group(batch, groups, restart, self._group_features)

    def _pass(self, spans: list[tuple[TaskSet, int, int]], size: int, restart: RestartState | None) -> SecondPass:
        shared, alpha = self._shared, self.settings.alpha
        groups = [Group(start, stop, shared.set_data(tasks, alpha)) for tasks, start, stop in spans]
        return SecondPass(groups, size, shared.merger, alpha, shared.installed.generic_keys,
                          shared.dense_value(alpha), kept=shared.kept, restart=restart)

    def _batched_features(self, batch: Batch, groups: list[tuple[TaskSet, torch.Tensor]],
                          restart: RestartState | None) -> torch.Tensor:
        plan = Plan.of(groups)
        ordered = None if restart is None else restart.rows(plan.order)
        with active(self._pass(plan.spans, len(plan.order), ordered)):
            return plan.unpermute(self._shared.runner(index_batch(batch, plan.order)))

    def _group_features(self, tasks: TaskSet, batch: Batch, restart: RestartState | None) -> torch.Tensor:
        size = batch_size_of(batch)
        with active(self._pass([(tasks, 0, size)], size, restart)):
            return self._shared.runner(batch)

    def _reference_features(self, tasks: TaskSet, batch: Batch, restart: RestartState | None) -> torch.Tensor:
        """Every weight of ``theta_0 + alpha * TSV-M(tasks)`` formed densely from exact SVD polar factors."""
        shared, alpha = self._shared, self.settings.alpha
        delta = shared.factors.merged_delta(tasks)
        params = {f"model.{key}": add_delta(shared.base[key], value, alpha) for key, value in delta.items()}
        with shared._reference_lock, active(None if restart is None else ReferencePass(restart)):
            return functional_call(shared.runner, params, (batch,), strict=False)  # swaps the shared parameters

    @staticmethod
    def _per_group(batch: Batch, groups: list[tuple[TaskSet, torch.Tensor]], restart: RestartState | None,
                   run: Callable[[TaskSet, Batch, RestartState | None], torch.Tensor]) -> torch.Tensor:
        if len(groups) == 1:
            return run(groups[0][0], batch, restart)
        parts = [(index, run(tasks, index_batch(batch, index), None if restart is None else restart.rows(index)))
                 for tasks, index in groups]
        out = parts[0][1].new_empty((sum(len(index) for index, _ in parts), *parts[0][1].shape[1:]))
        for index, feats in parts:
            out[index] = feats
        return out

    # -- heads and the whole call ------------------------------------------------------------------------------
    def choose(self, features: torch.Tensor, selected: torch.Tensor, probs: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(task, class) per sample among its selected tasks, by the head rule."""
        with self._shared.stage("second pass + heads"):
            logits = [head(features) for head in self.heads]
            return choose(logits, selected, rule=self.settings.head_rule, probs=probs)

    @torch.no_grad()
    def forward(self, batch: Batch, task: int | torch.Tensor | None = None, *,
                return_features: bool = False) -> MASSOutput:
        """Predict (task, class) per sample; with ``task`` given (the oracle) the router is skipped."""
        batch = self.inputs(batch)
        if task is not None:
            return self._given(batch, task, return_features)
        routing = self.route(batch)
        feats = self.second_pass_features(batch, group_by_task_set(routing.selected), routing.restart)
        pred_task, label = self.choose(feats, routing.selected, routing.probs)
        return MASSOutput(pred_task, label, routing.probs, routing.selected, routing.residuals,
                          feats if return_features else None)

    def _given(self, batch: Batch, task: int | torch.Tensor, return_features: bool) -> MASSOutput:
        size = batch_size_of(batch)
        tasks = torch.as_tensor(task, dtype=torch.long)
        tasks = tasks.expand(size) if tasks.ndim == 0 else tasks
        if tasks.shape != (size,) or bool(((tasks < 0) | (tasks >= self.factors.num_tasks)).any()):
            raise OptionError(f"task: expected task indices in [0, {self.factors.num_tasks}) for {size} samples")
        selected = torch.zeros(size, self.factors.num_tasks, dtype=torch.bool, device=self.device)
        selected[torch.arange(size, device=self.device), tasks.to(self.device)] = True
        feats = self.second_pass_features(batch, group_by_task_set(selected))
        pred_task, label = self.choose(feats, selected, selected.float())
        return MASSOutput(pred_task, label, selected.float(), selected, None, feats if return_features else None)


__all__ = ["FeatureRunner", "MASSModel", "check_parts", "place", "MASSOutput", "Routing", "STRATEGIES", "StageClock", "Strategy", "default_features",
           "group_by_task_set", "index_batch"]
