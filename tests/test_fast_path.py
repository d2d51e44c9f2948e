"""The fast MASS path against the reference path (dense merged weights through functional_call)."""

from __future__ import annotations

import pytest
import torch

from massmerge.errors import OptionError
from massmerge.mass import mean_pool
from massmerge.mass.fast import FastMASSModel, use_dense
from massmerge.mass.model import MASSModel, MergedFactors

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

