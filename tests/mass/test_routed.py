"""The routed wrappers and the first- and second-pass kernels, module by module, against dense references.

A tiny model with one Linear, one Embedding and one LayerNorm, and random low-rank task vectors: each kernel's
output for a batch of two task-set groups is compared with the plain module run on ``theta_0 + alpha *
TSV-M(S)`` formed densely from the exact SVD polar factors (``ExpertFactors.merged_delta``), group by group.
"""

from __future__ import annotations

import pytest
import torch
from lowrank_fixtures import rel
from torch import nn
from torch.nn import functional as F

from massmerge.mass.batch import Plan, RowSets
from massmerge.mass.experts import ExpertFactors
from massmerge.mass.first_pass import FirstPass
from massmerge.mass.routed import (
    RoutedEmbedding,
    RoutedLayerNorm,
    RoutedLinear,
    StopForward,
    Unbatchable,
    active,
    install,
    plain_class,
)
from massmerge.mass.second_pass import (
    Ledger,
    SecondPass,
    SetData,
    buy_dense,
    dense_cost,
    side_cost,
    use_dense,
)
from massmerge.mass.setmerge import SetMerger

WIDTH, VOCAB, T, ALPHA = 12, 30, 3, 0.7


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, 2 * WIDTH)
        self.out = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(self.norm(self.embed(ids)))))


@pytest.fixture(scope="module")
def parts() -> tuple[Tiny, dict[str, torch.Tensor], ExpertFactors, SetMerger]:
    torch.manual_seed(0)
    model = Tiny().double().eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    tvs = []
    for _ in range(T):
        tv = {}
        for key, value in base.items():
            if value.ndim == 2:
                m, n = value.shape
                tv[key] = 0.3 * torch.randn(m, 2, generator=gen, dtype=torch.float64) @ torch.randn(
                    2, n, generator=gen, dtype=torch.float64)
            else:
                tv[key] = 0.1 * torch.randn(value.shape, generator=gen, dtype=torch.float64)
        tvs.append(tv)
    factors = ExpertFactors.build(iter(tvs), [f"t{t}" for t in range(T)], rank_fraction=0.25, dtype=torch.float64)
    reference = {tasks: factors.merged_delta(tasks) for tasks in [(0,), (1, 2), (0, 1, 2)]}
    merger = SetMerger(factors)
    install(model, [*factors.matrices, *factors.non_matrix], [])
    return model, base, factors, merger, reference


def set_data(merger: SetMerger, factors: ExpertFactors, base: dict, tasks: tuple[int, ...]) -> SetData:
    rows = {key: st.rows(tasks) for key, st in merger.stacked.items()}
    values = {key: base[key] + ALPHA * torch.stack([per[t] for t in tasks]).mean(0)
              for key, per in factors.non_matrix.items()}
    return SetData(tasks, rows, merger.cores(tasks), values)


def dense(base: dict, delta: dict, key: str) -> torch.Tensor:
    return base[key] + ALPHA * delta[key]


def dense_value(key, value, data):  # generic owners: not used by this model
    raise AssertionError("no generic owner here")


def second_pass(merger, factors, base, sets, sizes, strategy="auto", ids=None, fallback=True) -> SecondPass:
    """Rows of set i contiguous (``sizes[i]`` each), or laid out by ``ids`` (a set index per row)."""
    data = [set_data(merger, factors, base, tasks) for tasks in sets]
    if ids is None:
        ids = torch.arange(len(sets)).repeat_interleave(torch.tensor(sizes))
    return SecondPass.of(data, ids, merger, ALPHA, frozenset(), dense_value, strategy=strategy, fallback=fallback)


# ----- the wrappers ----------------------------------------------------------------------------------------------

def test_install_swaps_classes_in_place_and_computes_the_base_outside_a_pass(parts) -> None:
    model, base, *_ = parts
    assert type(model.fc) is RoutedLinear and type(model.embed) is RoutedEmbedding
    assert type(model.norm) is RoutedLayerNorm
    assert plain_class(model.fc) is nn.Linear and plain_class(model.norm) is nn.LayerNorm
    assert list(model.state_dict()) == list(base)
    plain = Tiny().double().eval()
    plain.load_state_dict(base)
    ids = torch.randint(0, VOCAB, (4, 5))
    assert torch.equal(model(ids), plain(ids))


# ----- first pass ------------------------------------------------------------------------------------------------

def test_first_pass_uses_its_values_and_stops_at_the_deepest_routing_layer(parts) -> None:
    model, base, *_ = parts
    shifted = {key: value + 0.01 for key, value in base.items()}
    first = FirstPass(lambda key, value: shifted.get(key, value), ["fc", "out"], frozenset())
    ids = torch.randint(0, VOCAB, (2, 4))
    with active(first), pytest.raises(StopForward):
        model(ids)
    x = F.embedding(ids, shifted["embed.weight"])
    x = F.layer_norm(x, (WIDTH,), shifted["norm.weight"], shifted["norm.bias"])
    assert torch.allclose(first.captured["fc"], x)
    hidden = torch.tanh(F.linear(x, shifted["fc.weight"], shifted["fc.bias"]))
    assert torch.allclose(first.captured["out"], hidden)


# ----- second pass, module by module -----------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["side", "dense", "auto"])
def test_linear_of_two_groups_is_each_sets_dense_linear(parts, strategy) -> None:
    model, base, factors, merger, reference = parts
    x = torch.randn(5, 3, WIDTH, dtype=torch.float64)
    run = second_pass(merger, factors, base, [(0,), (1, 2)], [2, 3], strategy)
    with active(run):
        got = model.fc(x)
    for (tasks, lo, hi) in [((0,), 0, 2), ((1, 2), 2, 5)]:
        delta = reference[tasks]
        expected = F.linear(x[lo:hi], dense(base, delta, "fc.weight"), dense(base, delta, "fc.bias"))
        assert rel(got[lo:hi], expected) < 1e-9, (strategy, tasks)


def test_embedding_and_layer_norm_of_two_groups(parts) -> None:
    model, base, factors, merger, reference = parts
    ids = torch.randint(0, VOCAB, (4, 6))
    x = torch.randn(4, 6, WIDTH, dtype=torch.float64)
    run = second_pass(merger, factors, base, [(0, 1, 2), (0,)], [3, 1])
    with active(run):
        embedded, normed = model.embed(ids), model.norm(x)
    for tasks, lo, hi in [((0, 1, 2), 0, 3), ((0,), 3, 4)]:
        delta = reference[tasks]
        assert rel(embedded[lo:hi], F.embedding(ids[lo:hi], dense(base, delta, "embed.weight"))) < 1e-9
        expected = F.layer_norm(x[lo:hi], (WIDTH,), dense(base, delta, "norm.weight"), dense(base, delta, "norm.bias"))
        assert rel(normed[lo:hi], expected) < 1e-12


def test_one_group_of_the_whole_batch_needs_no_batch_layout(parts) -> None:
    """A single set over the whole batch is never split, so a sequence-first input runs too."""
    model, base, factors, merger, reference = parts
    x = torch.randn(7, 2, WIDTH, dtype=torch.float64)  # [L, B, D]: dim 0 is not the batch
    run = second_pass(merger, factors, base, [(1, 2)], [2])
    with active(run):
        got = model.fc(x)
    delta = reference[(1, 2)]
    assert rel(got, F.linear(x, dense(base, delta, "fc.weight"), dense(base, delta, "fc.bias"))) < 1e-9


def test_dense_weights_are_kept_for_the_next_batch_of_the_same_set(parts) -> None:
    from massmerge.mass.lru import LRU

    model, base, factors, merger, _ = parts
    kept = LRU(1)
    data = set_data(merger, factors, base, (0, 1, 2))
    run = SecondPass.of([data], torch.zeros(3, dtype=torch.long), merger, ALPHA, frozenset(), None,
                        strategy="dense", kept=kept)
    with active(run):
        first = model.fc(torch.randn(3, 2, WIDTH, dtype=torch.float64))
    weight = kept.peek(((0, 1, 2), ALPHA))["fc.weight"]
    with active(run):
        model.fc(torch.randn(3, 2, WIDTH, dtype=torch.float64))
    assert kept.peek(((0, 1, 2), ALPHA))["fc.weight"] is weight and first.shape == (3, 2, 2 * WIDTH)


# ----- the pieces the kernels are made of ----------------------------------------------------------------------

def test_plan_orders_largest_group_first_and_unpermutes() -> None:
    groups = [((0,), torch.tensor([1, 4])), ((1, 2), torch.tensor([0, 2, 3])), ((2,), torch.tensor([5]))]
    plan = Plan.of(groups)
    assert plan.order.tolist() == [0, 2, 3, 1, 4, 5]
    assert plan.spans == [((1, 2), 0, 3), ((0,), 3, 5), ((2,), 5, 6)]
    rows = torch.arange(6.0)[plan.order]
    assert torch.equal(plan.unpermute(rows), torch.arange(6.0))


def test_row_sets_lay_out_rows_expand_for_beams_and_broadcast_one_row() -> None:
    rows = RowSets(torch.tensor([1, 0, 1]), order=(1, 0))
    assert not rows.contiguous and not rows.whole
    layout = rows.layout(6)  # 2 beams per row: rows r -> ids[r // 2]
    assert layout.ids.tolist() == [1, 1, 0, 0, 1, 1]
    assert layout.spans == ((1, 0, 4), (0, 4, 6))
    x = torch.arange(6.0)
    assert layout.sort(x).tolist() == [0, 1, 4, 5, 2, 3] and torch.equal(layout.unsort(layout.sort(x)), x)
    assert rows.rows_of(torch.zeros(6, 2), Unbatchable)[1] == 6
    assert rows.rows_of(torch.zeros(1, 2), Unbatchable)[0].shape == (6, 2)  # broadcast over the rows last seen
    with pytest.raises(Unbatchable):
        rows.rows_of(torch.zeros(4, 2), Unbatchable)
    assert RowSets(torch.tensor([0, 0, 1]), order=(0, 1)).layout(3).perm is None  # already contiguous


@pytest.mark.parametrize("strategy", ["side", "dense", "auto", "union-runs", "union-padded", "per-set"])
def test_interleaved_and_beam_expanded_rows_are_each_rows_set(parts, strategy, monkeypatch) -> None:
    """Rows in any order (the seam's: the caller's batch), and B * n rows under beam search, row r -> ids[r // n];
    side branches through the union of the sets' tasks (mixed per run or padded) and set by set (READ_COST and
    use_padded force each)."""
    import massmerge.mass.second_pass as second

    if strategy in ("union-runs", "union-padded", "per-set"):
        monkeypatch.setattr(second, "READ_COST", 0 if strategy == "per-set" else 10**9)
        monkeypatch.setattr(second, "use_padded", lambda *_: strategy == "union-padded")
        strategy = "side"
    model, base, factors, merger, reference = parts
    sets, ids = [(0,), (1, 2), (0, 1, 2)], torch.tensor([2, 0, 1, 0, 2])
    run = second_pass(merger, factors, base, sets, None, strategy, ids=ids)
    for beams in (1, 3):
        x = torch.randn(5 * beams, 4, WIDTH, dtype=torch.float64)
        tokens = torch.randint(0, VOCAB, (5 * beams, 4))
        with active(run):
            got, normed, embedded = model.fc(x), model.norm(x), model.embed(tokens)
        for row in range(5 * beams):
            delta = reference[sets[int(ids[row // beams])]]
            expected = F.linear(x[row], dense(base, delta, "fc.weight"), dense(base, delta, "fc.bias"))
            assert rel(got[row], expected) < 1e-9, (strategy, beams, row)
            norm = F.layer_norm(x[row], (WIDTH,), dense(base, delta, "norm.weight"), dense(base, delta, "norm.bias"))
            assert rel(normed[row], norm) < 1e-12
            assert rel(embedded[row], F.embedding(tokens[row], dense(base, delta, "embed.weight"))) < 1e-9


def test_rows_that_are_no_multiple_of_the_batch_are_refused_in_one_line_under_the_seam(parts) -> None:
    from massmerge.errors import OptionError

    model, base, factors, merger, _ = parts
    run = second_pass(merger, factors, base, [(0,), (1, 2)], [2, 2], fallback=False)
    with active(run), pytest.raises(OptionError, match="task_sets: a routed module got input of shape \\[3, 12\\]"):
        model.fc(torch.randn(3, WIDTH, dtype=torch.float64))
    engine = second_pass(merger, factors, base, [(0,), (1, 2)], [2, 2])
    with active(engine), pytest.raises(Unbatchable):
        model.fc(torch.randn(3, WIDTH, dtype=torch.float64))


def test_dense_pays_off_only_with_many_tokens() -> None:
    """Forming W costs about k m n + 3 m n flops once; the side branch k (m + n) + k^2 per token."""
    m = n = 384
    threshold = next(tokens for tokens in range(1, 10_000) if use_dense(tokens, 48, m, n))
    assert not use_dense(threshold - 1, 48, m, n) and use_dense(threshold, 48, m, n)
    dense_flops = 48 * 48 * m + 48 * m * n + 3 * m * n
    assert (threshold - 1) * (48 * (m + n) + 48 * 48) <= dense_flops < threshold * (48 * (m + n) + 48 * 48)


def test_rent_or_buy_forms_the_dense_weight_once_the_side_branches_cost_its_price() -> None:
    """Hand-checked: forming a 3 x 4 weight of rank 2 costs 2*2*3 + 2*3*4 + 3*3*4 = 72; one call of 5 tokens
    reads 2*(3+4) = 14 numbers (16 units each) and multiplies 5 rows by them and the core: 224 + 5*(14+4) = 314.
    The ledger buys on the call that brings it to the price, then starts again empty."""
    assert dense_cost(2, 3, 4) == 72
    assert side_cost(5, 2, 3, 4) == 314
    spent: dict[str, int] = {}
    assert [buy_dense(spent, "w", 4, 10) for _ in range(3)] == [False, False, True]
    assert spent == {}
    assert not buy_dense(spent, "w", 9, 10) and spent == {"w": 9}
    assert buy_dense(spent, "v", 10, 10) and spent == {"w": 9}  # one call that costs the price buys at once


def test_a_run_of_one_set_buys_and_sets_that_alternate_never_do() -> None:
    """The ledger is per run: A's passes one after another add up, a pass of B starts over, so two sets whose
    passes alternate (each would evict the other's dense weight) keep renting."""
    ledger, a, b = Ledger(), ((0,), 1.0), ((1,), 1.0)
    assert [buy_dense(ledger.of(a), "w", 4, 10) for _ in range(3)] == [False, False, True]
    alternating = [buy_dense(ledger.of(owner), "w", 4, 10) for _ in range(5) for owner in (a, b)]
    assert not any(alternating) and ledger.owner == b and ledger.spent == {"w": 4}
    assert ledger.of(b) is ledger.spent  # the same run goes on


def test_union_pays_off_when_sets_share_tasks_and_tokens_are_few() -> None:
    """Per factor column: set by set reads each set's K_S rows and multiplies its tokens by them; the union reads
    the present tasks' rows once and multiplies every token by all of them."""
    from massmerge.mass.second_pass import READ_COST, use_union

    k = 8
    overlapping = [(1, 2 * k), (1, 2 * k), (1, 2 * k)]  # three one-row sets over 3 tasks (each pair of them)
    assert use_union(3 * k, overlapping)  # reads 3k instead of 6k numbers, multiplies 9k instead of 6k
    assert READ_COST * 3 * k + 3 * 3 * k < sum(READ_COST * r + t * r for t, r in overlapping)
    assert not use_union(3 * k, [(100, 2 * k), (100, 2 * k), (100, 2 * k)])  # many tokens: flops decide
    assert not use_union(2 * k, [(1, 2 * k)])  # one set: nothing to share
    assert not use_union(2 * k, [(1, k), (1, k)])  # disjoint sets read the same rows either way


def test_padded_mix_is_each_rows_core_on_its_sets_columns() -> None:
    """``PaddedMix.mix`` against a per-row loop: row r's set S takes Z's columns of S's stacked rows, multiplies
    them by ``C_S^T`` and puts them back, zeros elsewhere; sets of different ranks (padding) and a set of rank 0
    (all zeros), several tokens per row, rows in any order."""
    from massmerge.mass.second_pass import SpanViews, UnionPlan, padded_mix

    gen = torch.Generator().manual_seed(3)
    key, spans = "w", ((0, 3), (5, 9))  # stacked rows 0-2 and 5-8 are present: Z has 7 columns
    column = torch.full((9,), -1, dtype=torch.long)
    column[0:3], column[5:9] = torch.arange(3), torch.arange(3, 7)
    rows_of = [torch.tensor([0, 1, 2, 5]), torch.tensor([6, 8]), torch.tensor([], dtype=torch.long)]
    sets = [SetData((s,), {key: rows}, {key: torch.randn(len(rows), len(rows), generator=gen, dtype=torch.float64)},
                    {}) for s, rows in enumerate(rows_of)]
    ids = torch.tensor([1, 0, 2, 0, 1])
    tokens = 2
    plan = UnionPlan((0, 1, 2), spans, 7, 4, True, SpanViews((), ()))
    z = torch.randn(len(ids) * tokens, 7, generator=gen, dtype=torch.float64)
    expected = torch.zeros_like(z)
    for r, s in enumerate(ids.tolist()):
        cols = column[rows_of[s]]
        for t in range(r * tokens, (r + 1) * tokens):
            expected[t, cols] = z[t, cols] @ sets[s].cores[key].T
    mix = padded_mix(sets, ids, key, column, plan, tokens)
    assert torch.allclose(mix.mix(z), expected, atol=1e-12)
    assert mix.nbytes == 5 * 4 * 4 * 8 + 5 * tokens * 4 * 8  # cores and expanded columns per row
