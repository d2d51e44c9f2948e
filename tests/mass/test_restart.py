"""Beyond two passes: the second pass restarts at block j from the first pass's hidden states.

Every j from 1 to the routing block agrees, to 1e-5, with an independent reference built from plain modules:
the first-pass model (``first_pass_state``) run to block j with a hook that keeps block j - 1's output, then
the set's model (``theta_0 + alpha * TSV-M(S)`` from the exact SVD reference, ``merged_delta``) run with that
output put in place of block j - 1's. On a tiny BERT (padding, mixed task sets) and a tiny CLIP vision tower, in
float64, so that 1e-5 measures the restart and not float32 rounding of the merge (tested on its own elsewhere).
"""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch

from massmerge.adapters import get_adapter
from massmerge.errors import OptionError
from massmerge.heads import LinearHead, ZeroShotHead
from massmerge.mass import ExpertFactors, MASSModel, make_serve_settings
from massmerge.mass.serving import serve
from massmerge.task_vectors import add_delta

from lowrank_fixtures import rel

transformers = pytest.importorskip("transformers")
TASKS = 4


def vectors_for(model: torch.nn.Module, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{key: 0.05 * torch.randn(value.shape, generator=gen, dtype=value.dtype)
             for key, value in model.state_dict().items() if value.is_floating_point()} for _ in range(TASKS)]


def heads_for(width: int, seed: int) -> list[torch.nn.Module]:
    gen = torch.Generator().manual_seed(seed)
    return [ZeroShotHead(torch.randn(4 + t, width, generator=gen), 50.0) if t % 2
            else LinearHead(torch.randn(4 + t, width, generator=gen, dtype=torch.float64)) for t in range(TASKS)]


def build(model: torch.nn.Module, family: str, **adapter_options) -> tuple[MASSModel, torch.nn.Module, object]:
    """(MASS model over ``model``, a plain copy made before any routed class was installed, adapter)."""
    plain = copy.deepcopy(model)
    adapter = get_adapter(family, **adapter_options).bind(model)
    factors = ExpertFactors.build(iter(vectors_for(model, 1)), [f"t{t}" for t in range(TASKS)], eps=0.3,
                                  dtype=torch.float64)
    layer = adapter.routing_layer(model)
    settings = make_serve_settings(routing_layers=(layer,))
    mass = MASSModel(model, factors, heads_for(adapter.feature_dim(model) or 16, 2), settings, pool=adapter.pool,
                     features=adapter.features, blocks=adapter.block_names(model))
    return mass, plain, adapter


@pytest.fixture(scope="module")
def bert():
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    return build(transformers.BertModel(config, add_pooling_layer=False).double().eval(), "text", special_ids=[0, 1, 2])


@pytest.fixture(scope="module")
def clip():
    config = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(0)
    return build(transformers.CLIPVisionModel(config).double().eval(), "clip")


def bert_batch(size: int, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (size, length), generator=gen)
    mask = torch.ones(size, length, dtype=torch.long)
    ids[:, 0] = 1
    for row in range(size):
        pad = row % 4
        if pad:
            ids[row, -pad:] = 0
            mask[row, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def clip_batch(size: int, seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(size, 3, 16, 16, generator=gen, dtype=torch.float64)}


def reference(mass: MASSModel, plain: torch.nn.Module, adapter, batch, tasks, j: int) -> torch.Tensor:
    """Plain modules only: block j - 1's output under the first-pass weights, then the set's weights from there."""
    first, second = copy.deepcopy(plain), copy.deepcopy(plain)
    first.load_state_dict({**first.state_dict(), **mass.first_pass_state()})
    delta = mass.factors.merged_delta(tasks)
    base = plain.state_dict()
    second.load_state_dict({**base, **{k: add_delta(base[k], v, mass.settings.alpha) for k, v in delta.items()}})
    names = adapter.block_names(plain)
    kept = {}
    handle = dict(first.named_modules())[names[j - 1]].register_forward_hook(
        lambda module, args, output: kept.setdefault("out", output))
    with torch.no_grad():
        adapter.features(first, batch)
    handle.remove()
    handle = dict(second.named_modules())[names[j - 1]].register_forward_hook(lambda module, args, output: kept["out"])
    with torch.no_grad():
        features = adapter.features(second, batch)
    handle.remove()
    return features


def routing_block(mass: MASSModel, adapter) -> int:
    return next(i for i, name in enumerate(adapter.block_names(mass.model))
                if mass.settings.routing_layers[-1].startswith(name + "."))


@pytest.mark.parametrize("family", ["bert", "clip"])
def test_every_restart_block_matches_the_plain_module_reference(family, request) -> None:
    mass, plain, adapter = request.getfixturevalue(family)
    batch = bert_batch(6) if family == "bert" else clip_batch(6)
    last = routing_block(mass, adapter)
    assert last == 3  # round(0.75 * 4): restart at 1, 2 and 3
    for j in range(1, last + 1):
        view = mass.with_settings(restart_block=j)
        routing = view.route(batch)
        assert len(routing.restart) == 6
        for tasks in [(0,), (1, 3), (0, 1, 2, 3)]:
            index = torch.arange(6)
            got = view.second_pass_features(batch, [(tasks, index)], routing.restart)
            expected = reference(view, plain, adapter, batch, tasks, j)
            assert rel(got, expected) < 1e-5, (family, j, tasks)
            strict = view.with_settings(strategy="reference").second_pass_features(batch, [(tasks, index)],
                                                                                   routing.restart)
            assert rel(strict, expected) < 1e-5, (family, j, tasks, "reference strategy")


def test_restart_zero_is_the_two_pass_rule_exactly(bert) -> None:
    mass, _, _ = bert
    batch = bert_batch(8)
    default, zero = mass(batch, return_features=True), mass.with_settings(restart_block=0)(batch, return_features=True)
    assert torch.equal(default.features, zero.features) and torch.equal(default.task, zero.task)
    assert mass.route(batch).restart is None  # nothing is recorded or kept


@pytest.mark.parametrize("strategy", ["batched", "grouped", "reference"])
def test_mixed_task_sets_with_padding_restart_per_sample(bert, strategy) -> None:
    """A batch of mixed task sets and paddings gives each sample its own restart: the features of one sample
    served alone."""
    mass, _, _ = bert
    view = mass.with_settings(restart_block=2, strategy=strategy)
    batch = bert_batch(8, seed=4)
    routing = view.route(batch)
    groups = [((0,), torch.tensor([0, 3, 5])), ((1, 2), torch.tensor([1, 2, 7])), ((0, 1, 2, 3), torch.tensor([4, 6]))]
    got = view.second_pass_features(batch, groups, routing.restart)
    for tasks, index in groups:
        for row in index.tolist():
            alone = {k: v[row:row + 1] for k, v in batch.items()}
            solo = view.second_pass_features(alone, [(tasks, torch.arange(1))], view.route(alone).restart)
            assert rel(got[row:row + 1], solo) < 1e-5, (strategy, tasks, row)


def test_served_stream_regroups_the_hidden_states_of_a_window(bert) -> None:
    """serve() routes a window, keeps each input's hidden states, and lays them out again in batches of other
    inputs and another padding: the predictions of each input served alone."""
    mass, _, _ = bert
    view = mass.with_settings(restart_block=3)
    batch = bert_batch(20, seed=6)
    items = [{k: v[i][batch["attention_mask"][i].bool()] for k, v in batch.items()} for i in range(20)]

    def collate(rows):
        length = max(len(r["input_ids"]) for r in rows)
        return {k: torch.stack([torch.nn.functional.pad(r[k], (0, length - len(r[k]))) for r in rows])
                for k in ("input_ids", "attention_mask")}

    served = list(serve(view, items, collate, batch_size=6, size_of=lambda item: len(item["input_ids"]),
                        return_features=True))
    for i, prediction in enumerate(served):
        alone = view(collate([items[i]]), return_features=True)
        assert prediction.task == int(alone.task) and prediction.label == int(alone.label)
        assert rel(prediction.features, alone.features[0]) < 1e-5


def test_two_threads_give_the_serial_results(clip) -> None:
    mass, _, _ = clip
    view = mass.with_settings(restart_block=2)
    batches = [clip_batch(5, seed=s) for s in range(6)]
    serial = [view(b, return_features=True) for b in batches]
    results: dict[int, object] = {}

    def work(indices: list[int]) -> None:
        for i in indices:
            results[i] = view(batches[i], return_features=True)

    threads = [threading.Thread(target=work, args=([0, 2, 4],)), threading.Thread(target=work, args=([1, 3, 5],))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(serial):  # a kept dense weight may stand in for a side branch: same to rounding
        got = results[i]
        assert torch.equal(got.task, expected.task) and torch.equal(got.selected, expected.selected)
        assert rel(got.features, expected.features) < 1e-10


def test_restart_blocks_beyond_the_first_pass_or_unknown_blocks_are_refused(bert) -> None:
    mass, plain, _ = bert
    with pytest.raises(OptionError, match="--restart-block 4: the first pass stops in block 3"):
        mass.with_settings(restart_block=4)
    model = copy.deepcopy(plain)
    factors = ExpertFactors.build(iter(vectors_for(model, 1)), [f"t{t}" for t in range(TASKS)])
    settings = make_serve_settings(routing_layers=("encoder.layer.3.intermediate.dense",), restart_block=2)
    with pytest.raises(OptionError, match="blocks are unknown"):
        MASSModel(model, factors, heads_for(16, 2), settings)


def test_artifacts_built_before_restart_blocks_serve_as_before(tmp_path) -> None:
    """A manifest without the new serve fields (restart_block, dtype) loads, restarts at 0 and predicts exactly
    as the same artifact with them."""
    from massmerge.artifact import load, save_artifact

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()  # what load() rebuilds from config.json: with its pooler
    mass, plain, adapter = build(model, "text", special_ids=[0, 1, 2])
    save_artifact(mass, tmp_path / "art", adapter=adapter)
    batch = bert_batch(9, seed=8)
    now = load(tmp_path / "art")(batch)
    manifest = tmp_path / "art" / "manifest.json"
    data = json.loads(manifest.read_text())
    for field in ("restart_block", "dtype"):
        del data["serve"][field]
    manifest.write_text(json.dumps(data))
    before = load(tmp_path / "art")
    assert before.settings.restart_block == 0
    old = before(batch)
    assert torch.equal(old.task, now.task) and torch.equal(old.label, now.label) and torch.equal(old.probs, now.probs)
