"""The engine on every device present, against the CPU float32 reference: serving, mixed task sets, half
precision, load(), build's SVDs and the static merges.

Tolerances: float32 on any device agrees with the CPU to 1e-4 (relative); float16 serving to 2e-3 and bfloat16
to 2e-2 on the features of the toy model (docs/BENCHMARKS.md, "Devices"), with the same routing: the factors
stay float32 under bfloat16 (mass.model.place says why).
"""

from __future__ import annotations

import copy

import pytest
import torch

from massmerge import merging
from massmerge.artifact import load, save_artifact
from massmerge.mass import ExpertFactors, MASSModel, mean_pool
from massmerge.mass.serving import serve

from lowrank_fixtures import rel
from toy_mass import make_batch, make_experts, make_parts

SETS = [(0,), (1, 3), (0, 1, 2, 3)]
HALF_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def parts():
    return make_parts(4)


def fresh(parts, **options) -> MASSModel:
    base, factors, heads, cfg = copy.deepcopy(parts)
    return MASSModel(base, factors, heads, cfg, pool=mean_pool(), **options)


def test_serving_on_the_device_matches_the_cpu(parts, device) -> None:
    reference, placed = fresh(parts), fresh(parts, device=device)
    assert placed.device.type == device.type and placed.dtype == torch.float32
    batch = make_batch(24, seed=5)
    for tasks in SETS:
        assert rel(placed.features_with(tasks, batch).cpu(), reference.features_with(tasks, batch)) < 1e-4, tasks
    ours, theirs = placed(batch), reference(batch)
    assert torch.equal(ours.selected.cpu(), theirs.selected) and torch.equal(ours.task.cpu(), theirs.task)
    assert rel(ours.probs.cpu(), theirs.probs) < 1e-4


def test_mixed_task_sets_in_one_batch_on_the_device(parts, device) -> None:
    reference, placed = fresh(parts), fresh(parts, device=device)
    batch = make_batch(12, seed=7)
    groups = [((0,), torch.arange(0, 4)), ((1, 3), torch.arange(4, 9)), ((0, 1, 2, 3), torch.arange(9, 12))]
    expected = reference.second_pass_features(batch, groups)
    for strategy in ("batched", "grouped"):
        got = placed.with_settings(strategy=strategy).second_pass_features(batch, groups)
        assert rel(got.cpu(), expected) < 1e-4, strategy


def test_served_stream_on_the_device_gives_the_cpu_predictions(parts, device) -> None:
    items = list(make_batch(40, seed=9))
    reference, placed = fresh(parts), fresh(parts, device=device)

    def collate(rows):
        return torch.stack(list(rows))

    ours = list(serve(placed, items, collate, batch_size=8))
    theirs = list(serve(reference, items, collate, batch_size=8))
    assert [(p.task, p.label) for p in ours] == [(p.task, p.label) for p in theirs]
    assert all(p.probs.device.type == "cpu" for p in ours)  # predictions come back to the host once per batch


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_serving_within_its_documented_tolerance(parts, device, dtype) -> None:
    reference, placed = fresh(parts), fresh(parts, device=device, dtype=dtype)
    assert placed.dtype == dtype
    batch = make_batch(24, seed=5)
    for tasks in SETS:
        got = placed.features_with(tasks, batch).float().cpu()
        assert rel(got, reference.features_with(tasks, batch)) < HALF_TOLERANCE[dtype], tasks
    assert torch.equal(placed(batch).selected.cpu(), reference(batch).selected)


def test_load_places_an_artifact_and_takes_a_serving_dtype(parts, device, tmp_path) -> None:
    base = copy.deepcopy(parts[0])
    save_artifact(fresh(parts), tmp_path / "art")
    batch = make_batch(16, seed=3)
    on_cpu = load(tmp_path / "art", base_model=copy.deepcopy(base), pool=mean_pool())
    placed = load(tmp_path / "art", base_model=copy.deepcopy(base), pool=mean_pool(), device=device)
    assert placed.device.type == device.type
    assert torch.equal(placed(batch).task.cpu(), on_cpu(batch).task)
    half = load(tmp_path / "art", base_model=copy.deepcopy(base), pool=mean_pool(), device=device, dtype="float16")
    assert half.dtype == torch.float16 and half.settings.dtype == "float16"
    with pytest.raises(Exception, match="--dtype"):
        half.with_settings(dtype="float32")  # a view shares the weights: another precision means another load


def test_build_svds_on_the_device_keep_their_factors_on_the_cpu(parts, device) -> None:
    base = parts[0]
    tvs = make_experts(base, 3, seed=4)
    names = ["a", "b", "c"]
    reference = ExpertFactors.build(iter(copy.deepcopy(tvs)), names)
    placed = ExpertFactors.build(iter(copy.deepcopy(tvs)), names, device=device)
    for key, per_task in reference.matrices.items():
        for ours, theirs in zip(placed.matrices[key], per_task):
            assert ours.U.device.type == "cpu"
            assert rel(ours.reconstruct(), theirs.reconstruct()) < 1e-4, key
    assert placed.accepted == reference.accepted


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tsv_m", "iso_cts"])
def test_static_merges_on_the_device(parts, device, method) -> None:
    base = {k: v.detach().clone() for k, v in parts[0].state_dict().items()}
    tvs = make_experts(parts[0], 3, seed=6)
    expected = merging.merge(method, base, copy.deepcopy(tvs))
    got = merging.merge(method, base, copy.deepcopy(tvs), device=device)
    for key, value in expected.items():
        assert got[key].device.type == device.type
        assert rel(got[key].cpu(), value) < 1e-5, (method, key)
