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
call one model at once. :meth:`MASSModel.task_sets` is the public seam: any forward or ``generate()`` of the
served module with each row under its own task set (:mod:`.seam`). Task sets' merges come from the stored factors with no SVD (:mod:`.setmerge`) and are
cached across calls, keyed by the set and alpha. Serve settings can change per view (:meth:`with_settings`)
without repeating any of that work.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from massmerge.device import to_device
from massmerge.errors import OptionError
from massmerge.heads.rules import choose
from massmerge.mass import router
from massmerge.mass.batch import Plan, batch_size_of, batch_tokens, group_by_task_set, index_batch
from massmerge.mass.checks import check_parts, check_restart, place
from massmerge.mass.clock import StageClock
from massmerge.mass.config import ServeSettings, check_generation, make_serve_settings
from massmerge.mass.experts import ExpertFactors, StateDict
from massmerge.mass.first_pass import FirstPass
from massmerge.mass.outputs import Generated, MASSOutput, Routing
from massmerge.mass.pooling import PoolFn, identity_pool
from massmerge.mass.reference import reference_features, reference_state
from massmerge.mass.restart import RestartState, block_hidden, join_rows, split_rows
from massmerge.mass.routed import StopForward, Unbatchable, active, install, install_blocks
from massmerge.mass.seam import Rows, TaskSets, row_sets
from massmerge.mass.second_pass import SecondPass
from massmerge.mass.setmerge import TaskSet
from massmerge.mass.shared import Batch, FeatureFn, FeatureRunner, Shared, default_features

Strategy = Literal["auto", "batched", "grouped", "reference"]
STRATEGIES = ("auto", "batched", "grouped", "reference")


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
        self._shared = Shared(base_model.eval(), factors, features)
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

    def _pass(self, tasks: Sequence[TaskSet], ids: torch.Tensor, restart: RestartState | None, *,
              counts: Sequence[int] | None = None, fallback: bool = True) -> SecondPass:
        """The second pass of rows ``ids`` (an index into ``tasks`` per row; ``counts``: rows per set, when the
        rows are already contiguous in that order)."""
        shared, alpha = self._shared, self.settings.alpha
        sets = [shared.set_data(t, alpha) for t in tasks]
        return SecondPass.of(sets, ids, shared.merger, alpha, shared.installed.generic_keys,
                             shared.dense_value(alpha), counts=counts, kept=shared.kept, ledger=shared.ledger,
                             restart=restart, fallback=fallback)

    def _batched_features(self, batch: Batch, groups: list[tuple[TaskSet, torch.Tensor]],
                          restart: RestartState | None) -> torch.Tensor:
        plan = Plan.of(groups)
        ordered = None if restart is None else restart.rows(plan.order)
        counts = [stop - start for _, start, stop in plan.spans]
        with active(self._pass([tasks for tasks, _, _ in plan.spans], plan.row_ids(), ordered, counts=counts)):
            return plan.unpermute(self._shared.runner(index_batch(batch, plan.order)))

    def _group_features(self, tasks: TaskSet, batch: Batch, restart: RestartState | None) -> torch.Tensor:
        size = batch_size_of(batch)
        ids = torch.zeros(size, dtype=torch.long, device=self.device)
        with active(self._pass([tasks], ids, restart, counts=[size])):
            return self._shared.runner(batch)

    def _reference_features(self, tasks: TaskSet, batch: Batch, restart: RestartState | None) -> torch.Tensor:
        """Every weight of ``theta_0 + alpha * TSV-M(tasks)`` formed densely from exact SVD polar factors."""
        return reference_features(self._shared, tasks, self.settings.alpha, batch, restart)

    def reference_state(self, tasks: Sequence[int]) -> StateDict:
        """The dense ``theta_0 + alpha * TSV-M(tasks)`` of every factored key, from the exact SVD polar factors
        (the reference path's weights: load them into a copy of the base to check any path against)."""
        return reference_state(self._shared, tuple(sorted(tasks)), self.settings.alpha)

    # -- the public seam -------------------------------------------------------------------------------------
    def task_sets(self, rows: Rows, *, batch: Batch | None = None,
                  restart: Sequence[torch.Tensor] | None = None) -> TaskSets:
        """A context in which ANY forward or ``generate()`` of :attr:`model` runs row r under its own task set
        (:mod:`massmerge.mass.seam`). ``rows``: ``Routing.selected`` ``[B, T]``, a task per row, or per row an
        iterable of tasks (indices or names). ``restart`` (``Routing.restart``, with its ``batch``): the prompt's
        first-pass hidden states when ``restart_block`` is set; only one forward may use them (a decode step under
        the same context is refused). The seam always runs the routed kernels, whatever the view's strategy."""
        sets, ids = row_sets(rows, self.task_names, self.device)
        if len(sets) > 1 and self._shared.batched_off_reason:
            raise OptionError(f"task_sets: this model cannot run mixed task sets in one forward "
                              f"({self._shared.batched_off_reason}); give one task set per call")
        state = None
        if restart is not None and self.settings.restart_block:
            if batch is None:
                raise OptionError("task_sets: restart states need the batch they were routed from (batch=...)")
            batch = self.inputs(batch)
            hidden = join_rows(restart, batch, batch_tokens(batch, restart))
            state = RestartState(self.settings.restart_block, hidden, self._shared.block_output_length)
        return TaskSets(self._pass(sets, ids, state, fallback=False), sets, ids)

    # -- routed generation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: Batch, *, routing: Routing | None = None, **generation: Any) -> Generated:
        """Route each prompt, then HF ``generate()`` of :attr:`model` with every prompt under its selected task
        set: the encoder and every decode step (beams and ``num_return_sequences`` rows follow their prompt).
        ``routing``: these prompts' routing, already computed (:meth:`route`; e.g. of a larger window, then cut
        with :meth:`Routing.rows`), instead of routing them again.

        ``batch``: the tokenized prompts (``input_ids``, ``attention_mask``); ``generation``: HF's arguments
        (``max_new_tokens``, ``num_beams``, ``do_sample``, ``streamer``, ...), the declared ones checked
        (:class:`~massmerge.mass.config.GenerateSettings`). Streaming: call this in a worker thread with a
        ``TextIteratorStreamer``; routing and the task sets are entered in that thread, so nothing is handed
        over. ``restart_block`` is refused: a decode step would run past the prompt's recorded states."""
        if self.settings.restart_block:
            raise OptionError(f"--restart-block {self.settings.restart_block}: generation runs a decode step per "
                              "token past the prompt's recorded states; use restart_block 0 to generate")
        check_generation(generation)
        batch = self.inputs(batch)
        if routing is None:
            routing = self.route(batch)
        elif routing.selected.shape[0] != batch_size_of(batch):
            raise OptionError(f"generate: routing= holds {routing.selected.shape[0]} prompts, the batch "
                              f"{batch_size_of(batch)}")
        with self._shared.stage("generate"), self.task_sets(routing.selected):
            try:
                sequences = self.model.generate(**batch, **generation)
            except ValueError as exc:  # HF's own checks of its arguments (num_return_sequences > num_beams...)
                raise OptionError(f"generate: {str(exc).strip().splitlines()[0]}") from None
        return Generated(sequences, routing)

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
        if not len(self.heads):
            raise OptionError("heads: this model has no class heads (it generates); call generate(...)")
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


__all__ = [
    "STRATEGIES",
    "FeatureFn",
    "FeatureRunner",
    "Generated",
    "MASSModel",
    "MASSOutput",
    "Routing",
    "StageClock",
    "Strategy",
    "TaskSets",
    "check_parts",
    "default_features",
    "group_by_task_set",
    "index_batch",
    "place",
]
