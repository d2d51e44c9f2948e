"""The second pass: every row under ``theta_0 + alpha * TSV-M(S)`` of its own task set S, in one forward.

Row identity is per row (:class:`~massmerge.mass.batch.RowSets`: a set id per sample, expanded for beams), so the
same pass runs the engine's second pass and any forward or ``generate()`` of the served module (the public seam,
:meth:`massmerge.mass.model.MASSModel.task_sets`). A kernel sees its input's rows in span order (each set's rows
contiguous; the engine's batches already are, the seam's are permuted per call and put back). A Linear runs
``x W_0^T`` once over all rows and adds each span's low-rank side branch ``alpha ((x_g V_S) C_S^T) U_S^T``
(:mod:`massmerge.mass.setmerge`) in one of three ways, chosen by what it reads and multiplies:

- set by set: each set's factor rows gathered, ``bmm`` over spans of equal size and rank (few sets, many tokens);
- through the union of the sets' tasks (:func:`use_union`: the sets share tasks, the tokens are few, as in a
  decode step of a mixed batch): ``x V_P^T`` over every present task's factors read once as views, each row's
  columns mixed by its set's core, ``+ alpha Y U_P``; with small cores (a LoRA library's) the mixing is one bmm
  over rows in the batch's own order, so nothing is laid out (:func:`use_padded`);
- for spans with many tokens, a transient dense weight (kept for the set's next batches, :func:`use_dense`);
  with one set for the whole batch also once the side branches this set has run on that matrix since it last
  formed it cost as much as forming it (rent or buy, :func:`buy_dense`: a decode step's few tokens never pay
  for a dense weight alone, a set's stream of decode steps does).

With one set for every row, the set's factor rows are read as views span by span (no gather). An Embedding adds
``alpha (U_S[ids] C_S) V_S^T``; a LayerNorm normalizes once and applies each span's affine; a scale-only norm
(T5's, RMSNorm) normalizes once and scales each span; a relative position bias (T5) is computed per set and
gathered per row. A module that no set of the pass changes runs as the base's. A generic owner runs, per span, a
shallow copy of itself whose parameters hold the set's dense values. With one set for every row nothing is laid
out, so that case works for any token layout (sequence-first models included).

Rows are read from dim 0 of a routed module's input: a multiple of the batch size, or 1 (broadcast); anything
else raises :class:`~massmerge.mass.batch.Unbatchable` in the engine (which runs one forward per set instead)
and a one-line :class:`~massmerge.errors.OptionError` under the seam, where nothing can fall back.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from massmerge.errors import OptionError
from massmerge.mass.batch import Layout, RowSets, Unbatchable
from massmerge.mass.lru import LRU
from massmerge.mass.restart import RestartState
from massmerge.mass.routed import (
    Pass,
    RoutedEmbedding,
    RoutedLayerNorm,
    RoutedLinear,
    active,
    plain_compute_bias,
    run_block,
    shallow_copy,
    subtree_keys,
)
from massmerge.mass.setmerge import SetMerger, Stacked, TaskSet
from massmerge.task_vectors import add_delta

# Memory passes of forming a dense weight (matmul output, add, cast), counted in units of m*n flops.
DENSE_OVERHEAD = 3
#: Multiply-adds that reading one number from memory costs: the ridge of the roofline, where a skinny product (a
#: decode step's few rows) stops being bound by memory. fp32 peak multiply-adds / bandwidth in numbers: ~20 for a
#: 2-core AVX2 CPU (96 G / 5 G), ~40 for an H100 (~30 T / 0.84 T); the low end, so the union path
#: (:func:`use_union`) is taken only where it reads clearly less. Measured here (bench/generate_cost.py, 4+4
#: blocks, random 1-3 task sets): the union path beat the per-set one at batch 8, 16 and 64 (docs/BENCHMARKS.md).
READ_COST = 16
#: Per pass, the bytes of mixed batches' gathered factor rows (``Ut[rows]``, ``Vt[rows]`` per run of task sets)
#: and stacked cores kept for the pass's later calls. Why: generation runs one pass per decode step for the same
#: sets, and gathering a large matrix's rows each step (the LM head's: 32128 rows x K) cost more than the side
#: branch itself. Bounded: past the budget they are gathered per call. (One set for the whole batch gathers
#: nothing: it reads its rows as views.)
GATHER_BYTES = 512 * 2**20


@dataclass(frozen=True)
class SetData:
    """One task set's merged parameters: per matrix key its rows in the stacked factors and its core; per
    non-matrix key ``theta_0 + alpha * mean delta`` (for the set's alpha)."""

    tasks: TaskSet
    rows: Mapping[str, torch.Tensor]
    cores: Mapping[str, torch.Tensor]
    values: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class UnionPlan:
    """How a pass's mixed groups run one matrix's side branches through the union of their tasks: the present
    tasks, their rows in the stacked factors as spans, the union's rank R_P, the widest set's K, and whether the
    cores are mixed padded in one bmm (:func:`use_padded`)."""

    present: TaskSet
    spans: tuple[tuple[int, int], ...]
    union: int
    widest: int
    padded: bool
    views: SpanViews = field(compare=False)


@dataclass(frozen=True)
class SpanViews:
    """Stacked factor rows ``[lo, hi)`` per span as views, made once per pass (why: a decode step's side branch
    is a few small products, and slicing and transposing the spans again on every call added small ops to each)."""

    vt: tuple[torch.Tensor, ...]  # per span, ``Vt[lo:hi].T``
    ut: tuple[torch.Tensor, ...]  # per span, ``Ut[lo:hi]``

    @classmethod
    def of(cls, st: Stacked, spans: Sequence[tuple[int, int]]) -> SpanViews:
        return cls(tuple(st.Vt[lo:hi].T for lo, hi in spans), tuple(st.Ut[lo:hi] for lo, hi in spans))


@dataclass(frozen=True)
class PaddedMix:
    """How the padded union path mixes one matrix's columns of ``Z = x V_P^T`` for a pass's rows (:func:`use_padded`):
    per sample row, its set's columns (``where``, padded to the widest K with column 0, expanded over the row's
    tokens) and its set's core (``cores``: ``C_S^T`` padded with zeros, so a padded column reads a value that its
    zero core entries drop and adds zeros where it lands). Built once per pass, rows and matrix
    (:func:`padded_mix`). Why: a decode step of a mixed batch runs every routed Linear through it; laid out per set
    (three small ops each) and twice per pass, as before, it cost a decode step's first calls more than their
    side branches."""

    where: torch.Tensor  # [rows, tokens per row, K] long
    cores: torch.Tensor  # [rows, K, K]
    shape: tuple[int, int, int]  # [rows, tokens per row, R_P]: Z's view

    def mix(self, z: torch.Tensor) -> torch.Tensor:
        """``Y``: each row's set's columns of ``z`` ([rows * tokens, R_P]) times its core, zero elsewhere."""
        view = z.view(self.shape)
        y = torch.zeros_like(view).scatter_add_(2, self.where, torch.bmm(view.gather(2, self.where), self.cores))
        return y.view(z.shape)

    @property
    def nbytes(self) -> int:
        return self.cores.numel() * self.cores.element_size() + self.where.numel() * self.where.element_size()


def padded_mix(sets: Sequence[SetData], ids: torch.Tensor, key: str, column: torch.Tensor, plan: UnionPlan,
               tokens: int) -> PaddedMix:
    """The :class:`PaddedMix` of rows whose set is ``sets[ids[r]]``, ``tokens`` each, under ``plan``
    (``column``: stacked row -> column of Z), laid out per set with one stack per rank (not per set and row), then
    picked per row."""
    widest = plan.widest
    count = len(sets)
    index = torch.zeros(count, widest, dtype=torch.long, device=column.device)
    cores = torch.zeros(count, widest, widest, dtype=sets[0].cores[key].dtype, device=column.device)
    by_rank: dict[int, list[int]] = {}
    for s in sorted(set(ids.tolist())):
        by_rank.setdefault(int(sets[s].rows[key].numel()), []).append(s)
    for rank, members in by_rank.items():
        if rank == 0:
            continue
        at = torch.tensor(members, device=column.device)
        index[at, :rank] = column[torch.stack([sets[s].rows[key] for s in members])]
        cores[at, :rank, :rank] = torch.stack([sets[s].cores[key] for s in members]).transpose(1, 2)
    rows = int(ids.shape[0])
    where = index.index_select(0, ids)[:, None, :].expand(rows, tokens, widest).contiguous()
    return PaddedMix(where, cores.index_select(0, ids), (rows, tokens, plan.union))


@dataclass
class Ledger:
    """The side-branch cost per matrix that the current run of one-set passes has spent (:func:`buy_dense`): a
    run is a set's passes one after another (a ``generate()``'s decode steps, the batches a stream sends in set
    order); a one-set pass of another set starts a new run. Why per run: only
    :data:`~massmerge.mass.shared.DENSE_SETS_KEPT` sets' dense weights are kept, so sets that alternate would each
    buy and evict the other's before using their own (twice the side branches' cost); a run pays only for what it
    can use itself."""

    owner: tuple[TaskSet, float] | None = None
    spent: dict[str, int] = field(default_factory=dict)

    def of(self, owner: tuple[TaskSet, float]) -> dict[str, int]:
        """``owner``'s spending, a fresh run if the last pass was another set's."""
        if owner != self.owner:
            self.owner, self.spent = owner, {}
        return self.spent


@dataclass(frozen=True)
class Group:
    """Rows ``[start, stop)`` of a kernel's span-ordered input share one task set."""

    start: int
    stop: int
    data: SetData

    @property
    def size(self) -> int:
        return self.stop - self.start


def dense_cost(rank: int, m: int, n: int) -> int:
    """Multiply-adds (and memory passes in their units) of forming ``W_0 + alpha U_S C_S V_S^T`` (m x n)."""
    return rank * rank * m + rank * m * n + DENSE_OVERHEAD * m * n


def use_dense(tokens: int, rank: int, m: int, n: int) -> bool:
    """Whether forming ``W_0 + alpha U_S C_S V_S^T`` is cheaper than the side branch for ``tokens`` rows."""
    return dense_cost(rank, m, n) < tokens * (rank * (m + n) + rank * rank)


def side_cost(tokens: int, rank: int, m: int, n: int) -> int:
    """What one call of a set's side branch costs, in the units of :data:`READ_COST`: its factors read
    (``rank (m + n)`` numbers) and multiplied by ``tokens`` rows."""
    return READ_COST * rank * (m + n) + tokens * (rank * (m + n) + rank * rank)


def buy_dense(spent: dict[str, int], key: str, call: int, price: int) -> bool:
    """Rent or buy (the ski-rental rule): add this call's side-branch cost ``call`` to what the set has spent on
    ``key``'s side branches in its current run (:class:`Ledger`), and buy (form the dense weight, the entry
    emptied) once that reaches ``price`` (:func:`dense_cost`). Why this rule: over a run it costs at most twice
    what the better of always renting and buying at once would have, with no constant fitted to a model or a
    stream."""
    total = spent.get(key, 0) + call
    if total >= price:
        spent.pop(key, None)
        return True
    spent[key] = total
    return False


def use_union(union_rank: int, groups: Sequence[tuple[int, int]]) -> bool:
    """Whether the side branches of groups ``(tokens, K_S)`` cost less through the union of their tasks' factors
    (``union_rank`` rows, read once; every token multiplies all of them) than set by set (each set's K_S rows
    read, its tokens multiply those only). Cost, per factor column of ``m + n`` numbers: :data:`READ_COST` per
    number read plus one per multiply-add."""
    per_set = sum(READ_COST * rank + tokens * rank for tokens, rank in groups)
    tokens = sum(tokens for tokens, _ in groups)
    return len(groups) > 1 and READ_COST * union_rank + tokens * union_rank < per_set


def use_padded(rows: int, widest: int, union_numbers: int) -> bool:
    """Whether the union path mixes every row at once with cores padded to the widest set's K (``rows K^2``
    numbers, one bmm) rather than per run of equal groups: when those cores are no larger than the factors the
    union reads anyway (``union_numbers``), so padding at most doubles what the step reads."""
    return rows * widest * widest <= union_numbers


def span_order(sets: Sequence[SetData], ids: torch.Tensor) -> list[int]:
    """Set ids in span order: most rows first (so the spans that take a dense weight form a prefix), then by set
    size (equal ranks adjacent: one bmm); the engine's :class:`~massmerge.mass.batch.Plan` order."""
    counts = torch.bincount(ids, minlength=len(sets)).tolist()
    return sorted(range(len(sets)), key=lambda s: (-counts[s], len(sets[s].tasks), s))


@dataclass
class SecondPass(Pass):
    """The second pass over rows, each with its task set's merged parameters (see module doc)."""

    sets: list[SetData]
    rows: RowSets
    merger: SetMerger
    alpha: float
    generic_keys: frozenset[str]
    dense_value: Callable[[str, torch.Tensor, SetData], torch.Tensor]  # generic keys: theta_0 + alpha delta_S
    strategy: str = "auto"  # auto | side | dense: how a Linear applies a set's delta
    # (set, alpha) -> key -> the set's dense weight W_0 + alpha U_S C_S V_S^T, kept across batches (auto and dense
    # strategies). Why: serving sends a set's batches one after another, so forming its weights once instead of
    # once per batch saves k m n flops per matrix and batch (about 7% of predict at T = 8)
    kept: LRU[tuple[TaskSet, float], dict[str, torch.Tensor]] | None = None
    ledger: Ledger | None = None  # the current run's side-branch costs (buy_dense)
    restart: RestartState | None = None  # blocks before restart.block return the first pass's hidden states
    fallback: bool = True  # the engine falls back to one forward per set (Unbatchable); the seam cannot
    _whole: SetData | None = field(init=False)
    _groups: dict[int, list[Group]] = field(init=False)
    _restarted: set[int] = field(init=False)
    _lock: threading.Lock = field(init=False)
    _gathered: dict[tuple[Any, ...], torch.Tensor] = field(init=False)
    _gathered_bytes: int = field(init=False)
    _asked: set[tuple[Any, ...]] = field(init=False)
    _spans_of: dict[tuple[str, TaskSet], tuple[tuple[int, int], SpanViews]] = field(init=False)
    _plans: dict[tuple[Any, ...], UnionPlan | None] = field(init=False)
    _in_order: dict[tuple[str, int, int], UnionPlan | None] = field(init=False)
    _mixes: dict[tuple[Any, ...], PaddedMix] = field(init=False)
    _changed_keys: dict[str, bool] = field(init=False)

    @classmethod
    def of(cls, sets: Sequence[SetData], ids: torch.Tensor, merger: SetMerger, alpha: float,
           generic_keys: frozenset[str], dense_value: Callable[[str, torch.Tensor, SetData], torch.Tensor],
           counts: Sequence[int] | None = None, **options: Any) -> SecondPass:
        """The pass of rows ``ids`` (a set index per sample) over ``sets``, spans in :func:`span_order`; with
        ``counts`` (rows per set), the rows are already in that order: set i's are the i-th span."""
        order = list(range(len(sets))) if counts is not None else span_order(sets, ids)
        return cls(list(sets), RowSets(ids, order, counts), merger, alpha, generic_keys, dense_value, **options)

    def __post_init__(self) -> None:
        self._whole = self.sets[next(iter(self.rows.counts))] if self.rows.whole else None
        if self._whole is not None and self.ledger is not None:
            self.ledger.of((self._whole.tasks, self.alpha))  # this set's run goes on, or starts
        self._groups = {}
        self._restarted = set()
        self._lock = threading.Lock()
        self._gathered = {}
        self._gathered_bytes = 0
        self._asked = set()
        self._spans_of = {}
        self._plans = {}
        self._in_order = {}
        self._mixes = {}
        self._changed_keys = {}

    def _factor_rows(self, st: Stacked, key: str, part: str, rows: torch.Tensor, ident: tuple[int, ...]
                     ) -> torch.Tensor:
        """``st.Ut[rows]`` (part ``U``) or ``st.Vt[rows]`` (``V``) of the sets ``ident`` names, :meth:`_kept`."""
        # one set's rows [K] and a run's stacked rows [G, K] differ
        return self._kept((key, part, rows.ndim, ident), lambda: (st.Ut if part == "U" else st.Vt)[rows])

    def _kept(self, cache_key: tuple[Any, ...], make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()``, kept from its second use in the pass (a decode step) within :data:`GATHER_BYTES` (why:
        see there); a one-forward pass keeps nothing."""
        found = self._gathered.get(cache_key)
        if found is None:
            found = make()
            size = found.numel() * found.element_size()
            if cache_key not in self._asked:
                self._asked.add(cache_key)
            elif self._gathered_bytes + size <= GATHER_BYTES:
                self._gathered[cache_key] = found
                self._gathered_bytes += size
        return found

    def _changed(self, key: str) -> bool:
        """Whether any set of the pass holds its own value of non-matrix ``key`` (answered once per pass)."""
        found = self._changed_keys.get(key)
        if found is None:
            found = self._changed_keys[key] = any(key in data.values for data in self.sets)
        return found

    # -- rows -----------------------------------------------------------------------------------------------
    def _refuse(self, message: str) -> Exception:
        return Unbatchable(message) if self.fallback else OptionError(f"task_sets: {message}; run one task "
                                                                      "set per call")

    def _align(self, x: torch.Tensor) -> tuple[torch.Tensor, Layout, list[Group]]:
        """``x`` in span order, its layout and its groups (``x`` carries the rows on dim 0, see module doc)."""
        x, size = self.rows.rows_of(x, self._refuse)
        layout = self.rows.layout(size)
        return layout.sort(x), layout, self._groups_of(layout)

    def _groups_of(self, layout: Layout) -> list[Group]:
        found = self._groups.get(layout.size)
        if found is None:
            found = self._groups[layout.size] = [Group(start, stop, self.sets[s]) for s, start, stop in layout.spans]
        return found

    def narrowed(self, data: SetData, size: int, restart: RestartState | None = None) -> SecondPass:
        """A pass of ``size`` rows all under ``data`` (the whole-batch path)."""
        return SecondPass([data], RowSets.single(size, self.rows.ids.device), self.merger, self.alpha,
                          self.generic_keys, self.dense_value, self.strategy, self.kept, self.ledger, restart,
                          self.fallback)

    # -- blocks ---------------------------------------------------------------------------------------------
    def block(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        index = module.mass_block_index  # type: ignore[attr-defined]
        if self.restart is None or index >= self.restart.block:
            return run_block(module, args, kwargs)
        with self._lock:
            again, _ = index in self._restarted, self._restarted.add(index)
        if again:
            raise OptionError(f"restart_block {self.restart.block}: a second forward under the same task sets (a "
                              "decode step) would run past the prompt; use restart_block 0 to generate")
        return self.restart.output()

    # -- Linear ---------------------------------------------------------------------------------------------
    def _dense(self, tokens: int, st: Stacked, data: SetData, key: str, rank: int) -> bool:
        if self.strategy != "auto":
            return self.strategy == "dense"
        kept = None if self.kept is None else self.kept.peek((data.tasks, self.alpha))
        if kept is not None and key in kept:
            return True  # already formed: as cheap as the base's own matmul
        return use_dense(tokens, rank, st.Ut.shape[1], st.Vt.shape[1])

    def _buy(self, tokens: int, st: Stacked, data: SetData, key: str, rank: int) -> bool:
        """Whether the whole batch's set forms its dense weight of ``key`` now, by :func:`buy_dense`."""
        if self.strategy != "auto" or self.kept is None or self.ledger is None:
            return False
        m, n = st.Ut.shape[1], st.Vt.shape[1]
        return buy_dense(self.ledger.of((data.tasks, self.alpha)), key, side_cost(tokens, rank, m, n),
                         dense_cost(rank, m, n))

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

    def _spans(self, st: Stacked, data: SetData, key: str) -> tuple[tuple[tuple[int, int], ...], SpanViews]:
        """The set's rows of ``key`` as spans of the stacked factors, and their views (once per pass)."""
        found = self._spans_of.get((key, data.tasks))
        if found is None:
            spans = st.spans(data.tasks)
            found = self._spans_of[(key, data.tasks)] = (spans, SpanViews.of(st, spans))
        return found

    def _add_side(self, out: torch.Tensor, x: torch.Tensor, st: Stacked, data: SetData, key: str) -> None:
        """``out += alpha ((x V_S) C_S^T) U_S^T`` for one set, reading the set's factor rows as views of the
        stacked factors, span by span (no gather: see :meth:`Stacked.spans`), alpha folded into the last
        product."""
        spans, views = self._spans(st, data, key)
        flat = _flat(x, st)
        target = out.view(-1, out.shape[-1])
        if len(spans) > 1 and x.ndim == 3 and x.shape[1] == 1 and target.dtype == st.Ut.dtype:
            # one token per row (a decode step): the set's rows gathered once and kept for the pass's later
            # steps (:meth:`_kept`), two products instead of two per span
            rows, ident = data.rows[key], (id(data),)
            inner = (flat @ self._factor_rows(st, key, "V", rows, ident).T) @ data.cores[key].T
            target.addmm_(inner, self._factor_rows(st, key, "U", rows, ident), alpha=self.alpha)
            return
        _add_span_products(target, _span_products(flat, views) @ data.cores[key].T, views, self.alpha)

    def linear(self, module: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
        name = module.mass_name
        wkey, bkey = f"{name}.weight", f"{name}.bias"
        st = self.merger.stacked.get(wkey)
        data = self._whole
        if data is not None:
            bias = data.values.get(bkey, module.bias)
            rank = 0 if st is None else int(data.rows[wkey].numel())
            if rank == 0:
                return F.linear(x, module.weight, bias)
            tokens = x.numel() // x.shape[-1]
            if self._dense(tokens, st, data, wkey, rank) or self._buy(tokens, st, data, wkey, rank):
                return F.linear(x, self._dense_weight(module.weight, st, data, wkey), bias)
            out = F.linear(x, module.weight, bias)
            self._add_side(out, x, st, data, wkey)
            return out
        if st is None and not self._changed(bkey):  # no set changes it: the base's own
            return F.linear(x, module.weight, module.bias)
        if st is not None and not self._changed(bkey):
            found = self._linear_in_batch_order(module, x, st, wkey)
            if found is not None:
                return found
        x, layout, groups = self._align(x)
        return layout.unsort(self._linear_groups(module, x, groups, st, wkey, bkey))

    def _linear_in_batch_order(self, module: RoutedLinear, x: torch.Tensor, st: Stacked, key: str
                               ) -> torch.Tensor | None:
        """The Linear with every row left where it is, when its side branches take the padded union path
        (:class:`PaddedMix`, which needs no span order): no sort of ``x`` and no unsort of the output (two
        copies per call, a decode step's main cost beside a LoRA library's small side branches). None otherwise.
        Decided, and the mixing laid out, once per pass and rows: a decode step's calls do only the products."""
        rows, size = self.rows.rows_of(x, self._refuse)
        per_sample = math.prod(rows.shape[1:-1])  # tokens per sample row
        decided = (key, size, per_sample)
        if decided not in self._in_order:
            self._in_order[decided] = self._in_order_plan(st, key, size, per_sample)
        plan = self._in_order[decided]
        if plan is None:
            return None
        mix = self._padded_mix(st, key, plan, ("batch order", size, per_sample), self.sets,
                               lambda: self.rows.layout(size).ids, per_sample)
        out = F.linear(rows, module.weight, module.bias)
        _add_through_union(out, rows, st, plan, mix.mix, self.alpha)
        return out

    def _in_order_plan(self, st: Stacked, key: str, size: int, per_sample: int) -> UnionPlan | None:
        """The padded union plan of ``size`` rows in the batch's order, or None when the union path is not padded
        or some group takes a dense weight."""
        groups = self._groups_of(self.rows.layout(size))
        plan = self._union_plan(st, key, groups, per_sample)
        if plan is None or not plan.padded or any(
                self._dense(g.size * per_sample, st, g.data, key, int(g.data.rows[key].numel())) for g in groups):
            return None
        return plan

    def _padded_mix(self, st: Stacked, key: str, plan: UnionPlan, ident: tuple[Any, ...], sets: Sequence[SetData],
                    ids: Callable[[], torch.Tensor], tokens: int) -> PaddedMix:
        """:func:`padded_mix` of the rows whose set is ``sets[ids()[r]]``, kept for the pass within
        :data:`GATHER_BYTES` from its first use (its cost is the same kept or not; a decode step's next calls
        reuse it)."""
        cache_key = (key, *ident)
        found = self._mixes.get(cache_key)
        if found is None:
            found = padded_mix(sets, ids(), key, self._column(st, key, plan), plan, tokens)
            with self._lock:
                if self._gathered_bytes + found.nbytes <= GATHER_BYTES:
                    self._mixes[cache_key] = found
                    self._gathered_bytes += found.nbytes
        return found

    def _linear_groups(self, module: RoutedLinear, x: torch.Tensor, groups: list[Group], st: Stacked | None,
                       wkey: str, bkey: str) -> torch.Tensor:
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
        descheduled threads; a few bmm beat many small matmuls); or, when the sets share tasks enough that
        reading each present task's factors once costs less (:func:`use_union`), through :meth:`_add_union`."""
        plan = self._union_plan(st, key, groups, x[:1].numel() // x.shape[-1])
        if plan is not None:
            self._add_union(out, x, groups, st, key, offset, plan)
            return
        for run in _runs(groups, key):
            rank = int(run[0].data.rows[key].numel())
            if rank == 0:
                continue
            lo, hi = run[0].start - offset, run[-1].stop - offset
            rows = torch.stack([g.data.rows[key] for g in run])  # [G, K]
            xs = x[lo:hi].reshape(len(run), -1, x.shape[-1]).to(st.Vt.dtype)
            ident = tuple(id(g.data) for g in run)
            vt, ut = self._factor_rows(st, key, "V", rows, ident), self._factor_rows(st, key, "U", rows, ident)
            cores = self._kept(("C", key, ident), lambda run=run: torch.stack([g.data.cores[key] for g in run]))
            inner = torch.bmm(torch.bmm(xs, vt.transpose(1, 2)), cores.transpose(1, 2))  # (x V_S) C_S^T
            target = out[lo:hi]
            if target.dtype == inner.dtype and target.is_contiguous():
                target.view(len(run), -1, target.shape[-1]).baddbmm_(inner, ut, alpha=self.alpha)
            else:
                target.add_((self.alpha * torch.bmm(inner, ut)).to(target.dtype).view(target.shape))

    def _union_plan(self, st: Stacked, key: str, groups: Sequence[Group], per_sample: int) -> UnionPlan | None:
        """How the groups' side branches of ``key`` run (None: set by set), decided once per pass and rows."""
        cache_key = (key, id(groups[0]), len(groups), per_sample)
        if cache_key not in self._plans:
            present = tuple(sorted(set().union(*(g.data.tasks for g in groups))))
            spans = st.spans(present)
            union = sum(hi - lo for lo, hi in spans)
            ranks = [int(g.data.rows[key].numel()) for g in groups]
            plan = None
            if use_union(union, [(g.size * per_sample, rank) for g, rank in zip(groups, ranks)]):
                rows = groups[-1].stop - groups[0].start
                plan = UnionPlan(present, spans, union, max(ranks),
                                 use_padded(rows, max(ranks), union * (st.Ut.shape[1] + st.Vt.shape[1])),
                                 SpanViews.of(st, spans))
            self._plans[cache_key] = plan
        return self._plans[cache_key]

    def _add_union(self, out: torch.Tensor, x: torch.Tensor, groups: Sequence[Group], st: Stacked, key: str,
                   offset: int, plan: UnionPlan) -> None:
        """The side branches of every group (rows in span order from ``offset``) through the present tasks'
        factors read once, as views: ``Z = x V_P^T`` (one product per span of stacked rows), each group's columns
        of Z mixed by its core, scattered into ``Y`` (zero elsewhere), ``out += alpha Y U_P``. The mixing runs as
        one bmm over rows with cores padded to the largest K when those cores are no larger than the factors the
        union reads (a LoRA library's small ranks, :class:`PaddedMix`), else one bmm per run of groups of equal
        size and rank."""
        if plan.padded:
            tokens = math.prod(x.shape[1:-1])
            ident = ("span order", id(groups[0]), len(groups), offset, x.shape[0], tokens)
            mix = self._padded_mix(st, key, plan, ident, [g.data for g in groups], lambda: _span_ids(groups, x.device),
                                   tokens).mix
        else:
            column = self._column(st, key, plan)
            mix = lambda z: self._mix_runs(z, groups, key, column, offset, x.shape[0])
        _add_through_union(out, x, st, plan, mix, self.alpha)

    def _column(self, st: Stacked, key: str, plan: UnionPlan) -> torch.Tensor:
        """Stacked row -> its column of ``Z = x V_P^T`` under ``plan`` (:func:`_columns`, kept for the pass)."""
        return self._kept(("P", key, plan.present), lambda: _columns(st, plan.spans))

    def _mix_runs(self, z: torch.Tensor, groups: Sequence[Group], key: str, column: torch.Tensor, offset: int,
                  rows: int) -> torch.Tensor:
        """``Y`` as :meth:`PaddedMix.mix` gives it, one bmm per run of groups of equal size and rank."""
        y = torch.zeros_like(z)
        per_row = z.shape[0] // rows  # tokens per sample row
        for run in _runs(groups, key):
            rank = int(run[0].data.rows[key].numel())
            if rank == 0:
                continue
            lo, hi = (run[0].start - offset) * per_row, (run[-1].stop - offset) * per_row
            ident = tuple(id(g.data) for g in run)
            index = self._kept(("I", key, ident),
                               lambda run=run: column[torch.stack([g.data.rows[key] for g in run])])
            cores = self._kept(("C", key, ident), lambda run=run: torch.stack([g.data.cores[key] for g in run]))
            where = index[:, None, :].expand(len(run), (hi - lo) // len(run), rank)
            inner = torch.bmm(z[lo:hi].view(len(run), -1, z.shape[1]).gather(2, where), cores.transpose(1, 2))
            y[lo:hi].view(len(run), -1, y.shape[1]).scatter_(2, where, inner)
        return y

    # -- Embedding ------------------------------------------------------------------------------------------
    def embedding(self, module: RoutedEmbedding, ids: torch.Tensor) -> torch.Tensor:
        key = f"{module.mass_name}.weight"
        st = self.merger.stacked.get(key)
        whole = self._whole
        if whole is None and st is None and not self._changed(key):  # the base's own table
            return F.embedding(ids, module.weight, module.padding_idx, module.max_norm, module.norm_type,
                               module.scale_grad_by_freq, module.sparse)
        if whole is not None:
            layout, groups = None, [Group(0, int(ids.shape[0]) if ids.ndim else 1, whole)]
        else:
            ids, layout, groups = self._align(ids)
        out = F.embedding(ids, module.weight, module.padding_idx, module.max_norm, module.norm_type,
                          module.scale_grad_by_freq, module.sparse)
        if st is None and any(key in g.data.values for g in groups):  # a non-matrix table (T5's relative bias)
            out = torch.cat([F.embedding(ids if whole is not None else ids[g.start:g.stop],
                                         g.data.values.get(key, module.weight), module.padding_idx)
                             for g in groups])
        elif st is not None and self.strategy == "dense":
            out = torch.cat([F.embedding(ids if whole is not None else ids[g.start:g.stop],
                                         self._dense_weight(module.weight, st, g.data, key), module.padding_idx)
                             for g in groups])
        elif st is not None:
            self._add_embedding_deltas(out, ids, groups, st, key, whole is not None)
        return out if layout is None else layout.unsort(out)

    def _add_embedding_deltas(self, out: torch.Tensor, ids: torch.Tensor, groups: list[Group], st: Stacked,
                              key: str, whole: bool) -> None:
        flat_ids = ids.reshape(-1)
        per_sample = ids[:1].numel() if ids.ndim else 1
        flat = out.view(-1, out.shape[-1])
        for g in groups:
            rows = g.data.rows[key]
            if rows.numel() == 0:
                continue
            lo, hi = (0, flat.shape[0]) if whole else (g.start * per_sample, g.stop * per_sample)
            # [tokens_g, K]: only the set's own U rows at the group's ids (gathering every task's rows of a
            # 30522-row table cost 30x more: the columns of Ut are strided)
            u = st.Ut[rows.unsqueeze(1), flat_ids[lo:hi].unsqueeze(0)].T
            vt = self._factor_rows(st, key, "V", rows, (id(g.data),))
            flat[lo:hi] += ((u @ (self.alpha * g.data.cores[key])) @ vt).to(out.dtype)

    # -- norms ----------------------------------------------------------------------------------------------
    def layer_norm(self, module: RoutedLayerNorm, x: torch.Tensor) -> torch.Tensor:
        name = module.mass_name
        wkey, bkey = f"{name}.weight", f"{name}.bias"
        if self._whole is not None:
            values = self._whole.values
            return F.layer_norm(x, module.normalized_shape, values.get(wkey, module.weight),
                                values.get(bkey, module.bias), module.eps)
        x, layout, groups = self._align(x)
        out = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        if len(module.normalized_shape) != 1:  # rare: several normalized dims, apply per group
            for g in groups:
                part = out[g.start:g.stop]
                weight, bias = g.data.values.get(wkey, module.weight), g.data.values.get(bkey, module.bias)
                if weight is not None:
                    part.mul_(weight)
                if bias is not None:
                    part.add_(bias)
            return layout.unsort(out)
        if module.weight is not None:
            out.mul_(_group_rows([g.data.values.get(wkey, module.weight) for g in groups], groups, out.ndim))
        if module.bias is not None:
            out.add_(_group_rows([g.data.values.get(bkey, module.bias) for g in groups], groups, out.ndim))
        return layout.unsort(out)

    def scale_norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``weight * normalize(x)`` (T5's norm, RMSNorm): normalized once with a unit weight, scaled per row."""
        if self._whole is not None:
            return self.generic(module, (x,), {})
        key = f"{module.mass_name}.weight"
        if not self._changed(key):  # no set changes it: the base's own
            return module.mass_plain.forward(module, x)  # type: ignore[attr-defined]
        x, layout, groups = self._align(x)
        unit = shallow_copy(module, "", {"weight": torch.ones_like(module.weight)}, frozenset())(x)
        weights = [g.data.values.get(key, module.weight).to(unit.dtype) for g in groups]
        return layout.unsort(unit * _group_rows(weights, groups, unit.ndim))

    # -- relative position bias -----------------------------------------------------------------------------
    def relative_bias(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """T5's ``compute_bias`` (``[1, heads, q, k]``, from a table indexed by positions, no batch): each set's
        bias, gathered per row of the attention that asked (``[N, heads, q, k]``)."""
        if self._whole is not None:
            return plain_compute_bias(module, args, kwargs)
        table = getattr(module, "relative_attention_bias", None)
        key = f"{getattr(table, 'mass_name', '')}.weight"
        if table is not None and key not in self.merger.stacked and not self._changed(key):
            with active(self.narrowed(self.sets[0], 1)):  # no set changes the table: any set's bias is the base's
                return plain_compute_bias(module, args, kwargs)
        layout = self.rows.layout(self.rows.seen)
        present = [s for s, _, _ in layout.spans]
        biases = []
        for s in present:
            with active(self.narrowed(self.sets[s], 1)):
                biases.append(plain_compute_bias(module, args, kwargs))
        where = torch.zeros(len(self.sets), dtype=torch.long, device=layout.ids.device)
        where[present] = torch.arange(len(present), device=where.device)
        return torch.cat(biases)[where[layout.ids]]

    # -- generic owners -------------------------------------------------------------------------------------
    def _copy_for(self, module: nn.Module, data: SetData) -> nn.Module:
        owner = module.mass_name
        prefix = f"{owner}." if owner else ""
        params = dict(module.named_parameters(prefix=owner, remove_duplicate=False))
        values = {key: self.dense_value(key, params[key], data) for key in subtree_keys(self.generic_keys, owner)
                  if key in params}
        return shallow_copy(module, prefix, values, self.generic_keys)

    def generic(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._whole is not None:
            return self._copy_for(module, self._whole)(*args, **kwargs)
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.ndim
                      and v.shape[0] != 1), None)
        size = self.rows.seen if first is None else self.rows.rows_of(first, self._refuse)[1]
        layout = self.rows.layout(size)
        args = tuple(self._sorted_arg(a, layout) for a in args)
        kwargs = {k: self._sorted_arg(v, layout) for k, v in kwargs.items()}
        outputs = []
        for g in self._groups_of(layout):
            sub_args = tuple(_rows_of(a, g, size) for a in args)
            sub_kwargs = {k: _rows_of(v, g, size) for k, v in kwargs.items()}
            restart = None
            if self.restart is not None and size == self.rows.size:
                restart = self.restart.rows(layout.rows(g.start, g.stop))
            with active(self.narrowed(g.data, g.size, restart)):
                outputs.append(self._copy_for(module, g.data)(*sub_args, **sub_kwargs))
        return self._join(outputs, self._groups_of(layout), layout)

    def _sorted_arg(self, value: Any, layout: Layout) -> Any:
        if not isinstance(value, torch.Tensor) or not value.ndim or value.shape[0] == 1:
            return value
        if value.shape[0] != layout.size:
            raise self._refuse(f"a routed module got an argument of shape {list(value.shape)}; it sees "
                               f"{layout.size} rows")
        return layout.sort(value)

    def _join(self, outputs: list[Any], groups: list[Group], layout: Layout) -> Any:
        """Per-group outputs of a generic owner joined over the rows, in the batch's order (tensors, or tuples of
        tensors and Nones); an output of one row is that group's for each of its rows."""
        first = outputs[0]
        if isinstance(first, torch.Tensor):
            return layout.unsort(torch.cat([_expand(out, g.size, self._refuse) for out, g in zip(outputs, groups)]))
        if isinstance(first, tuple) and all(item is None or isinstance(item, torch.Tensor) for item in first):
            return tuple(None if items[0] is None else self._join(list(items), groups, layout)
                         for items in zip(*outputs))
        raise self._refuse(f"a routed module returned {type(first).__name__}, which cannot be joined over task sets")


def _expand(out: torch.Tensor, size: int, refuse: Callable[[str], Exception]) -> torch.Tensor:
    if out.ndim and out.shape[0] == size:
        return out
    if out.ndim and out.shape[0] == 1:
        return out.expand(size, *out.shape[1:])
    raise refuse(f"a routed module returned shape {list(out.shape)} for {size} rows")


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


def _span_ids(groups: Sequence[Group], device: torch.device) -> torch.Tensor:
    """Per row of span-ordered groups, its group's index."""
    sizes = torch.tensor([g.size for g in groups], device=device)
    return torch.arange(len(groups), device=device).repeat_interleave(sizes)


def _add_through_union(out: torch.Tensor, x: torch.Tensor, st: Stacked, plan: UnionPlan,
                       mix: Callable[[torch.Tensor], torch.Tensor], alpha: float) -> None:
    """``out += alpha mix(x V_P^T) U_P`` over the plan's spans (``mix``: each row's set's core on its columns)."""
    _add_span_products(out.view(-1, out.shape[-1]), mix(_span_products(_flat(x, st), plan.views)), plan.views, alpha)


def _flat(x: torch.Tensor, st: Stacked) -> torch.Tensor:
    """``x`` as ``[tokens, n]`` in the factors' dtype."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.dtype == st.Vt.dtype else flat.to(st.Vt.dtype)


def _span_products(flat: torch.Tensor, views: SpanViews) -> torch.Tensor:
    """``flat V^T`` over the stacked rows of the spans, span by span (views, no gather), columns in span order."""
    vt = views.vt
    if len(vt) == 1:
        return flat @ vt[0]
    return torch.cat([flat @ part for part in vt], dim=1)


def _add_span_products(target: torch.Tensor, inner: torch.Tensor, views: SpanViews, alpha: float) -> None:
    """``target += alpha inner U^T`` over the stacked rows of the spans (``inner``'s columns in span order)."""
    if len(views.ut) == 1 and target.dtype == inner.dtype:
        target.addmm_(inner, views.ut[0], alpha=alpha)
        return
    start = 0
    for ut in views.ut:
        part = inner[:, start:start + ut.shape[0]]
        start += ut.shape[0]
        if target.dtype == part.dtype:
            target.addmm_(part, ut, alpha=alpha)
        else:
            target.add_((alpha * (part @ ut)).to(target.dtype))


def _columns(st: Stacked, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Stacked row -> its column in the span-by-span product ``x V_P^T`` (-1 for rows outside the spans)."""
    out = torch.full((st.Vt.shape[0],), -1, dtype=torch.long, device=st.Vt.device)
    start = 0
    for lo, hi in spans:
        out[lo:hi] = torch.arange(start, start + hi - lo, device=out.device)
        start += hi - lo
    return out


def _group_rows(values: Sequence[torch.Tensor], groups: Sequence[Group], ndim: int) -> torch.Tensor:
    """Per-group vectors ``[D]`` as per-sample rows that broadcast over an ``ndim`` output ``[B, 1.., D]``."""
    stacked = torch.stack(list(values))
    sizes = [g.size for g in groups]
    if any(size != 1 for size in sizes):
        stacked = stacked.repeat_interleave(torch.tensor(sizes, device=stacked.device), dim=0)
    return stacked.view(stacked.shape[0], *([1] * (ndim - 2)), stacked.shape[-1])


def _rows_of(value: Any, group: Group, size: int) -> Any:
    """A generic owner's (span-ordered) argument cut to one group's rows; broadcast rows pass as they are."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == size:
        return value[group.start:group.stop]
    return value


__all__ = [
    "DENSE_OVERHEAD",
    "READ_COST",
    "Group",
    "Ledger",
    "SecondPass",
    "SetData",
    "UnionPlan",
    "buy_dense",
    "dense_cost",
    "side_cost",
    "span_order",
    "use_dense",
    "use_padded",
    "use_union",
]
