"""The fast MASS path against the reference path (dense merged weights through functional_call)."""

from __future__ import annotations

import pytest
import torch

from massmerge.errors import OptionError
from massmerge.heads import LinearHead, ZeroShotHead
from massmerge.mass import ExpertFactors, make_config, mean_pool
from massmerge.mass.batched import Unbatchable, check_batch_first
from massmerge.mass.fast import FastMASSModel, use_dense
from massmerge.mass.model import MASSModel, MergedFactors, group_by_task_set, index_batch

from toy_mass import make_batch, make_model, make_parts

SETS = [(0,), (1,), (0, 2), (1, 2, 3), (0, 1, 2, 3)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture(scope="module")
def reference() -> MASSModel:
    return make_model(4)


@pytest.mark.parametrize("strategy", ["side", "dense", "auto"])
@pytest.mark.parametrize("tasks", SETS)
def test_features_match_reference(reference, strategy, tasks):
    fast = FastMASSModel.from_model(reference, strategy=strategy)
    batch = make_batch(7)
    expected = reference.features_with(tasks, batch)
    got = fast.features_with(tasks, batch)
    assert rel(got, expected) < 1e-5
    if strategy == "dense":  # same operations as the reference: bit-identical
        assert torch.equal(got, expected)


def test_side_branch_really_differs_from_base(reference):
    """Guard against a fast path that silently runs the base: the delta must change the features."""
    fast = FastMASSModel.from_model(reference, strategy="side")
    batch = make_batch(5)
    base_features = reference.model(batch)
    assert rel(fast.features_with((0, 1), batch), base_features) > 1e-3


@pytest.mark.parametrize("strategy", ["side", "auto"])
def test_mixed_batch_predictions_match_reference(reference, strategy):
    fast = FastMASSModel.from_model(reference, strategy=strategy)
    batch = make_batch(24, seed=5)
    expected, got = reference(batch), fast(batch)
    assert len({tuple(r) for r in expected.selected.tolist()}) > 1, "batch should mix task sets"
    assert torch.equal(got.selected, expected.selected)
    assert torch.equal(got.task, expected.task)
    assert torch.equal(got.label, expected.label)
    assert rel(got.residuals, expected.residuals) < 1e-5


def test_forced_mixed_sets_match_per_sample_rebuild(reference):
    """Samples with arbitrary sets in one batch give what a per-sample rebuild of the merged model gives."""
    fast = FastMASSModel.from_model(reference, strategy="side")
    batch = make_batch(6, seed=9)
    selected = torch.zeros(6, 4, dtype=torch.bool)
    for row, tasks in enumerate([(0,), (1, 3), (0,), (2,), (0, 1, 2), (1, 3)]):
        selected[row, list(tasks)] = True
    out = fast.forward_with_sets(batch, selected)
    for row in range(6):
        tasks = tuple(selected[row].nonzero().flatten().tolist())
        feats = reference.features_with(tasks, batch[row:row + 1])
        logits = [reference.heads[t](feats) for t in tasks]
        best = torch.stack([lg.max(dim=1).values for lg in logits], dim=1).argmax(dim=1).item()
        assert out.task[row].item() == tasks[best]
        assert out.label[row].item() == logits[best].argmax(dim=1).item()


def test_oracle_mode_matches_reference(reference):
    fast = FastMASSModel.from_model(reference)
    batch = make_batch(8)
    tasks = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    assert torch.equal(fast(batch, task=tasks).label, reference(batch, task=tasks).label)


def test_first_pass_materializes_only_layers_before_routing(reference):
    fast = FastMASSModel.from_model(reference)
    batch = make_batch(4)
    z_fast = fast.routing_activation(batch)
    z_ref = reference.routing_activation(batch)
    assert torch.equal(z_fast, z_ref)
    keys = set(fast.first_pass_params())
    assert "blocks.0.fc1.weight" in keys and "embed.weight" in keys and "position" in keys
    assert "blocks.3.fc1.weight" not in keys and "final.weight" not in keys
    assert len(keys) < len(reference.first_pass_params())


def test_base_model_untouched_after_fast_forward(reference):
    before = {k: v.clone() for k, v in reference.model.state_dict().items()}
    fast = FastMASSModel.from_model(reference, strategy="side")
    fast(make_batch(10))
    after = reference.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all("forward" not in vars(m) for m in reference.model.modules())  # patches undone


def test_patches_undone_when_forward_raises(reference):
    fast = FastMASSModel.from_model(reference, strategy="side")
    with pytest.raises(Exception):
        fast.features_with((0,), torch.zeros(2, 99, dtype=torch.long))  # longer than the position table
    assert all("forward" not in vars(m) for m in reference.model.modules())


def test_reference_switch_runs_reference(reference):
    fast = FastMASSModel.from_model(reference, fast=False)
    batch = make_batch(5)
    assert torch.equal(fast.features_with((1, 2), batch), reference.features_with((1, 2), batch))


def test_unknown_strategy_refused():
    base, factors, heads, cfg = make_parts(2)
    with pytest.raises(OptionError, match="strategy"):
        FastMASSModel(base, factors, heads, cfg, pool=mean_pool(), strategy="magic")


def test_cost_model_prefers_side_for_few_tokens_and_dense_for_many():
    m, n, k = 64, 256, 8
    factors = MergedFactors(torch.zeros(m, k), torch.zeros(k), torch.zeros(n, k))
    assert not use_dense(4, factors, "auto")
    assert use_dense(10_000, factors, "auto")
    assert use_dense(4, factors, "dense") and not use_dense(10_000, factors, "side")



# ----- mixed task sets in one batched forward ---------------------------------------------------------------

MIXED_ROWS = [(0,), (1, 3), (0,), (2,), (0, 1, 2), (1, 3), (0,), (0,), (3,)]


def mixed_selection(rows: list[tuple[int, ...]], tasks: int = 4) -> torch.Tensor:
    selected = torch.zeros(len(rows), tasks, dtype=torch.bool)
    for row, chosen in enumerate(rows):
        selected[row, list(chosen)] = True
    return selected


def assert_groups_match(fast: FastMASSModel, reference: MASSModel, batch, selected: torch.Tensor) -> None:
    """Each sample's batched features equal the reference (dense rebuild) features of its own set to 1e-5."""
    with torch.no_grad():
        feats = fast.mixed_features(batch, selected)
        for tasks, index in group_by_task_set(selected):
            expected = reference.features_with(tasks, index_batch(batch, index))
            assert rel(feats[index], expected) < 1e-5, tasks


@pytest.fixture(scope="module")
def batchable() -> MASSModel:
    """The toy model without its directly-read position table, so every factored key can be batched."""
    base, factors, heads, cfg = make_parts(4)
    del factors.matrices["position"]
    factors.accepted.pop("position", None)
    return MASSModel(base, factors, heads, cfg, pool=mean_pool())


@pytest.mark.parametrize("strategy", ["side", "dense", "auto"])
def test_mixed_features_match_reference_per_group(batchable, strategy):
    fast = FastMASSModel.from_model(batchable, strategy=strategy)
    assert fast.batched_off_reason is None
    assert_groups_match(fast, batchable, make_batch(len(MIXED_ROWS), seed=3), mixed_selection(MIXED_ROWS))


def test_mixed_batch_runs_one_forward_and_matches_grouped_path(batchable):
    fast = FastMASSModel.from_model(batchable, strategy="side")
    grouped = FastMASSModel.from_model(batchable, strategy="side", batched=False)
    batch, selected = make_batch(len(MIXED_ROWS), seed=4), mixed_selection(MIXED_ROWS)
    fast.route(batch), grouped.route(batch)  # the first call also traces which layers the first pass reaches
    calls = []
    handle = batchable.model.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        got = fast.forward_with_sets(batch, selected)
        assert calls == [len(MIXED_ROWS), len(MIXED_ROWS)]  # first pass + ONE second pass
        calls.clear()
        expected = grouped.forward_with_sets(batch, selected)
        assert len(calls) == 1 + len(group_by_task_set(selected))
    finally:
        handle.remove()
    assert torch.equal(got.task, expected.task) and torch.equal(got.label, expected.label)
    assert all("forward" not in vars(m) for m in batchable.model.modules())


def test_mixed_routed_predictions_match_reference(batchable):
    fast = FastMASSModel.from_model(batchable)
    batch = make_batch(24, seed=5)
    expected, got = batchable(batch), fast(batch)
    assert len({tuple(r) for r in expected.selected.tolist()}) > 1, "batch should mix task sets"
    assert torch.equal(got.task, expected.task) and torch.equal(got.label, expected.label)


def test_unbatchable_parameter_falls_back_to_groups(reference):
    """The toy's position table is read by the parent's code: no batched patch exists, the per-group path runs."""
    fast = FastMASSModel.from_model(reference, strategy="side")
    assert "position" in (fast.batched_off_reason or "")
    with pytest.raises(Unbatchable):
        fast.mixed_features(make_batch(3), mixed_selection([(0,), (1,), (2,)]))
    selected = mixed_selection(MIXED_ROWS)
    batch = make_batch(len(MIXED_ROWS), seed=6)
    got = fast.forward_with_sets(batch, selected)
    task, label = reference._second_pass(batch, selected)
    assert torch.equal(got.task, task) and torch.equal(got.label, label)


def test_seq_first_models_are_refused():
    class SeqFirst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2)  # batch_first=False: [L, B, D]

    assert "seq-first" in (check_batch_first(SeqFirst()) or "")
    assert check_batch_first(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None


def tiny_bert_parts(num_tasks: int = 4):
    """A 2-layer HF BERT with factors on every floating parameter (embeddings, LayerNorms, biases included)."""
    transformers = pytest.importorskip("transformers")
    from massmerge.adapters import get_adapter

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    gen = torch.Generator().manual_seed(1)
    vectors = []
    for _ in range(num_tasks):
        vectors.append({key: 0.05 * torch.randn(value.shape, generator=gen)
                        for key, value in model.state_dict().items() if value.is_floating_point()})
    factors = ExpertFactors.build(iter(vectors), [f"t{t}" for t in range(num_tasks)], eps=0.3)
    adapter = get_adapter("text")
    cfg = make_config(routing_layer=adapter.routing_layer(model))
    heads = [ZeroShotHead(torch.randn(5 + t, 16, generator=gen), 50.0) if t % 2
             else LinearHead(torch.randn(5 + t, 16, generator=gen), torch.randn(5 + t, generator=gen))
             for t in range(num_tasks)]
    return model, factors, heads, cfg, adapter


@pytest.fixture(scope="module")
def bert() -> MASSModel:
    model, factors, heads, cfg, adapter = tiny_bert_parts()
    assert any("embeddings.word_embeddings" in k for k in factors.matrices)
    assert any("LayerNorm" in k for k in factors.non_matrix)
    return MASSModel(model, factors, heads, cfg, pool=adapter.pool, features=adapter.features)


def bert_batch(size: int, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (size, length), generator=gen)
    mask = torch.ones(size, length, dtype=torch.long)
    for row in range(size):
        pad = row % 4  # right padding of 0..3 tokens
        if pad:
            ids[row, -pad:] = 0
            mask[row, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("strategy", ["side", "dense", "auto"])
def test_bert_mixed_features_with_padding_match_reference(bert, strategy):
    fast = FastMASSModel.from_model(bert, strategy=strategy)
    assert fast.batched_off_reason is None
    assert_groups_match(fast, bert, bert_batch(len(MIXED_ROWS)), mixed_selection(MIXED_ROWS))


def test_bert_mixed_predictions_match_reference(bert):
    fast = FastMASSModel.from_model(bert)
    batch, selected = bert_batch(len(MIXED_ROWS), seed=1), mixed_selection(MIXED_ROWS)
    got = fast.forward_with_sets(batch, selected)
    task, label = bert._second_pass(batch, selected)
    assert fast.batched_off_reason is None
    assert torch.equal(got.task, task) and torch.equal(got.label, label)
    assert all("forward" not in vars(m) for m in bert.model.modules())
