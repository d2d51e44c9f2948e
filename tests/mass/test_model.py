"""The one MASS engine: every second-pass strategy against the dense reference (exact SVD polar factors, every
weight formed densely, functional_call), on a toy model, a tiny HF BERT and a tiny HF CLIP vision tower, with
mixed task sets and padding; threads; serve-time overrides; no SVD at serve time."""

from __future__ import annotations

import threading

import pytest
import torch

from massmerge.errors import OptionError
from massmerge.heads import LinearHead, ZeroShotHead
from massmerge.mass import ExpertFactors, MASSModel, make_serve_settings, mean_pool
from massmerge.mass.batch import group_by_task_set, index_batch
from massmerge.mass.routed import RoutedLinear, plain_class

from toy_mass import make_batch, make_parts

SETS = [(0,), (1,), (0, 2), (1, 2, 3), (0, 1, 2, 3)]
MIXED_ROWS = [(0,), (1, 3), (0,), (2,), (0, 1, 2), (1, 3), (0,), (0,), (3,)]
STRATEGIES = ["auto", "batched", "grouped"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def mixed_selection(rows: list[tuple[int, ...]], tasks: int = 4) -> torch.Tensor:
    selected = torch.zeros(len(rows), tasks, dtype=torch.bool)
    for row, chosen in enumerate(rows):
        selected[row, list(chosen)] = True
    return selected


def assert_mixed_match(model: MASSModel, batch, selected: torch.Tensor, tol: float = 1e-5) -> None:
    """Each sample's features (one call over the mixed batch) equal the reference rebuild of its own set."""
    reference = model.with_settings(strategy="reference")
    groups = group_by_task_set(selected)
    feats = model.second_pass_features(batch, groups)
    for tasks, index in groups:
        expected = reference.second_pass_features(index_batch(batch, index), [(tasks, torch.arange(len(index)))])
        assert rel(feats[index], expected) < tol, tasks


# ----- toy model: every parameter kind (Linear, Embedding, LayerNorm, a table read by the parent) -----------------

@pytest.fixture(scope="module")
def toy() -> MASSModel:
    base, factors, heads, cfg = make_parts(4)
    return MASSModel(base, factors, heads, cfg, pool=mean_pool())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("tasks", SETS)
def test_one_set_matches_reference(toy, strategy, tasks):
    batch = make_batch(7)
    expected = toy.with_settings(strategy="reference").features_with(tasks, batch)
    assert rel(toy.with_settings(strategy=strategy).features_with(tasks, batch), expected) < 1e-5


def test_the_delta_really_changes_the_features(toy):
    """Guard against a second pass that silently runs the base: the merged delta must change the features."""
    batch = make_batch(5)
    assert rel(toy.features_with((0, 1), batch), toy.model(batch)) > 1e-3


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mixed_sets_match_reference(toy, strategy):
    assert_mixed_match(toy.with_settings(strategy=strategy), make_batch(len(MIXED_ROWS), seed=3),
                       mixed_selection(MIXED_ROWS))


def test_routed_predictions_match_reference(toy):
    batch = make_batch(24, seed=5)
    expected, got = toy.with_settings(strategy="reference")(batch), toy(batch)
    assert len({tuple(r) for r in expected.selected.tolist()}) > 1, "batch should mix task sets"
    assert torch.equal(got.selected, expected.selected)
    assert torch.equal(got.task, expected.task) and torch.equal(got.label, expected.label)


def test_batched_runs_one_second_forward_and_grouped_one_per_set(toy):
    batch, selected = make_batch(len(MIXED_ROWS), seed=4), mixed_selection(MIXED_ROWS)
    groups = group_by_task_set(selected)
    calls: list[int] = []
    handle = toy.model.blocks[0].register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        toy.with_settings(strategy="batched").second_pass_features(batch, groups)
        batched_calls = list(calls)
        calls.clear()
        toy.with_settings(strategy="grouped").second_pass_features(batch, groups)
    finally:
        handle.remove()
    # the toy's root reads its position table directly, so the batched pass runs the root per group; the blocks
    # below it still see one group each, never a per-set model
    assert sum(batched_calls) == len(MIXED_ROWS) and len(calls) == len(groups)


def test_outside_mass_calls_the_model_is_the_base(toy):
    base, _, _, _ = make_parts(4)
    batch = make_batch(6)
    toy(batch)
    assert torch.equal(toy.model(batch), base(batch))
    assert any(isinstance(m, RoutedLinear) for m in toy.model.modules())
    assert all("forward" not in vars(m) for m in toy.model.modules())  # installed once, never rebound


def test_oracle_mode_equals_the_task_alone(toy):
    batch = make_batch(5)
    out = toy(batch, task=2, return_features=True)
    assert out.task.tolist() == [2] * 5
    assert rel(out.features, toy.with_settings(strategy="reference").features_with((2,), batch)) < 1e-5


def test_unknown_strategy_and_bad_task_are_refused(toy):
    with pytest.raises(OptionError, match="strategy"):
        toy.with_settings(strategy="magic")
    with pytest.raises(OptionError, match="task"):
        toy(make_batch(2), task=9)


def test_no_svd_at_serve_time(monkeypatch):
    """New task sets are merged from stored factors and small eigendecompositions only."""
    base, factors, heads, cfg = make_parts(4)
    model = MASSModel(base, factors, heads, cfg, pool=mean_pool())
    model(make_batch(3))  # the first pass is formed once, at the first call

    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD ran at serve time")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    monkeypatch.setattr(torch, "svd_lowrank", no_svd)
    for tasks in SETS:
        model.features_with(tasks, make_batch(4))
    model(make_batch(16, seed=9))


def test_set_cache_is_keyed_by_alpha(toy):
    batch = make_batch(5)
    half = toy.with_settings(alpha=0.5)
    got = half.features_with((0, 1), batch)
    assert rel(got, toy.features_with((0, 1), batch)) > 1e-3
    assert rel(got, half.with_settings(strategy="reference").features_with((0, 1), batch)) < 1e-5


def test_two_threads_give_the_serial_results(toy):
    batches = [make_batch(12, seed=s) for s in range(6)]
    serial = [toy(b) for b in batches]
    results: dict[int, object] = {}

    def work(indices: list[int]) -> None:
        for i in indices:
            results[i] = toy(batches[i])

    threads = [threading.Thread(target=work, args=([0, 2, 4],)), threading.Thread(target=work, args=([1, 3, 5],))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, expected in enumerate(serial):
        got = results[i]
        assert torch.equal(got.task, expected.task) and torch.equal(got.label, expected.label)
        assert torch.equal(got.selected, expected.selected)


def test_serve_overrides_change_the_routing_as_documented(toy):
    batch = make_batch(24, seed=5)
    default = toy(batch)
    top1 = toy.with_settings(mode="top1")(batch)
    assert (top1.selected.sum(1) == 1).all()
    assert torch.equal(top1.selected.float().argmax(1), default.probs.argmax(1))
    wide = toy.with_settings(eta=0.0, top_k=4)(batch)
    assert (wide.selected.sum(1) == 4).all()
    one = toy.with_settings(mode="batch")(batch)
    assert (one.selected == one.selected[0]).all()
    sharper = toy.with_settings(tau=0.25)(batch)
    assert (sharper.probs.max(1).values >= default.probs.max(1).values - 1e-6).all()
    posterior = toy.with_settings(head_rule="posterior")(batch)
    assert torch.equal(posterior.selected, default.selected)


# ----- a tiny HF BERT: embeddings, LayerNorms, biases, padding --------------------------------------------------

def tiny_bert_parts(num_tasks: int = 4):
    """A 2-layer HF BERT with factors on every floating parameter (embeddings, LayerNorms, biases included)."""
    transformers = pytest.importorskip("transformers")
    from massmerge.adapters import get_adapter

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    gen = torch.Generator().manual_seed(1)
    vectors = [{key: 0.05 * torch.randn(value.shape, generator=gen)
                for key, value in model.state_dict().items() if value.is_floating_point()} for _ in range(num_tasks)]
    factors = ExpertFactors.build(iter(vectors), [f"t{t}" for t in range(num_tasks)], eps=0.3)
    adapter = get_adapter("text", special_ids=[0, 1, 2])
    settings = make_serve_settings(routing_layers=(adapter.routing_layer(model),))
    heads = [ZeroShotHead(torch.randn(5 + t, 16, generator=gen), 50.0) if t % 2
             else LinearHead(torch.randn(5 + t, 16, generator=gen), torch.randn(5 + t, generator=gen))
             for t in range(num_tasks)]
    return model, factors, heads, settings, adapter


@pytest.fixture(scope="module")
def bert() -> MASSModel:
    model, factors, heads, settings, adapter = tiny_bert_parts()
    assert any("embeddings.word_embeddings" in k for k in factors.matrices)
    assert any("LayerNorm" in k for k in factors.non_matrix)
    return MASSModel(model, factors, heads, settings, pool=adapter.pool, features=adapter.features)


def bert_batch(size: int, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (size, length), generator=gen)
    mask = torch.ones(size, length, dtype=torch.long)
    ids[:, 0] = 1  # a [CLS]-like special token
    for row in range(size):
        pad = row % 4  # right padding of 0..3 tokens
        if pad:
            ids[row, -pad:] = 0
            mask[row, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bert_mixed_sets_with_padding_match_reference(bert, strategy):
    model = bert.with_settings(strategy=strategy)
    assert model.batched_off_reason is None
    assert_mixed_match(model, bert_batch(len(MIXED_ROWS)), mixed_selection(MIXED_ROWS))


def test_dense_weights_are_kept_for_the_next_batches_of_a_set(bert, monkeypatch):
    """A set's dense weights are formed once and reused by its next batches (serving sends them one after
    another), the results stay the reference's, and only DENSE_SETS_KEPT sets are kept."""
    from massmerge.mass import shared as engine
    from massmerge.mass import second_pass as routed

    model = bert.with_settings(strategy="auto")
    kept = model._shared.kept
    batches = [bert_batch(24, length=12, seed=seed) for seed in range(2)]
    reference = model.with_settings(strategy="reference")
    formed = []
    original = routed.add_delta
    monkeypatch.setattr(routed, "add_delta", lambda *a, **k: formed.append(1) or original(*a, **k))
    counts = []
    for batch in batches:
        assert rel(model.features_with((0, 2), batch), reference.features_with((0, 2), batch)) < 1e-5
        counts.append(len(formed))
    assert counts[0] > 0, "the batch was too small for a dense weight: the test would not test the kept weights"
    assert counts[1] == counts[0]  # the second batch formed no weight
    assert kept.peek(((0, 2), model.settings.alpha))
    for tasks in [(0,), (1,), (2, 3)]:
        model.features_with(tasks, batches[0])
    assert len(kept) == engine.DENSE_SETS_KEPT


@pytest.mark.parametrize("pooling", ["mean", "content", "tokens"])
def test_bert_routed_predictions_match_reference(bert, pooling):
    batch = bert_batch(12, seed=1)
    view = bert.with_settings(pooling=pooling)
    expected, got = view.with_settings(strategy="reference")(batch), view(batch)
    assert torch.equal(got.task, expected.task) and torch.equal(got.label, expected.label)
    assert bert.batched_off_reason is None


def test_token_residuals_of_one_word_inputs_equal_content_pooling(bert):
    """[CLS] word [SEP] + padding: one content token, so its residual is the content mean's residual."""
    batch = {"input_ids": torch.tensor([[1, 7, 2, 0], [1, 9, 2, 0], [1, 30, 2, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0]] * 3)}
    tokens, content = (bert.with_settings(pooling=p).route(batch).residuals for p in ("tokens", "content"))
    for layer in content:
        assert torch.allclose(tokens[layer], content[layer], atol=1e-5)


def test_bert_multi_layer_routing_stops_at_the_deepest_layer(bert):
    layers = ("encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense")
    view = bert.with_settings(routing_layers=layers, layer_combine="ppca")
    seen = []
    handle = bert.model.encoder.layer[1].output.register_forward_pre_hook(lambda *a: seen.append(1))
    try:
        acts = view.routing_activations(bert_batch(3))
    finally:
        handle.remove()
    assert set(acts) == set(layers) and seen == []
    out = view(bert_batch(5))
    assert out.residuals is not None and set(out.residuals) == set(layers)


# ----- a tiny HF CLIP vision tower: class token and conv patch embedding read by their owners -------------------

@pytest.fixture(scope="module")
def clip() -> MASSModel:
    transformers = pytest.importorskip("transformers")
    from massmerge.adapters import get_adapter

    config = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(config).eval()
    gen = torch.Generator().manual_seed(2)
    vectors = [{key: 0.05 * torch.randn(value.shape, generator=gen)
                for key, value in model.state_dict().items() if value.is_floating_point()} for _ in range(4)]
    factors = ExpertFactors.build(iter(vectors), [f"t{t}" for t in range(4)], eps=0.3)
    adapter = get_adapter("clip").bind(model)
    heads = [ZeroShotHead(torch.randn(4 + t, 16, generator=gen), 50.0) for t in range(4)]
    settings = make_serve_settings(routing_layers=(adapter.routing_layer(model),))
    return MASSModel(model, factors, heads, settings, pool=adapter.pool, features=adapter.features)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_clip_mixed_sets_match_reference(clip, strategy):
    pixels = torch.randn(len(MIXED_ROWS), 3, 16, 16, generator=torch.Generator().manual_seed(3))
    model = clip.with_settings(strategy=strategy)
    assert_mixed_match(model, {"pixel_values": pixels}, mixed_selection(MIXED_ROWS))
    generic = {plain_class(m).__name__ for m in clip.model.modules() if type(m) is not plain_class(m)}
    assert "CLIPVisionEmbeddings" in generic  # the class token's owner runs per group, generically


def test_clip_routed_predictions_match_reference(clip):
    batch = {"pixel_values": torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(4))}
    expected, got = clip.with_settings(strategy="reference")(batch), clip(batch)
    assert torch.equal(got.task, expected.task) and torch.equal(got.label, expected.label)


def test_seq_first_models_run_one_forward_per_set():
    """A sequence-first attention (batch on dim 1) cannot hold several sets in one forward: grouped runs."""
    class SeqFirst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = torch.nn.Linear(6, 8)
            self.attn = torch.nn.MultiheadAttention(8, 2)  # batch_first=False: [L, B, D]
            self.mlp = torch.nn.Linear(8, 8)
            self.out = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, L, 6]; the blocks run [L, B, 8]
            h = self.inp(x).transpose(0, 1)
            h = h + self.attn(h, h, h, need_weights=False)[0]
            return self.out(torch.relu(self.mlp(h))).mean(dim=0)

    torch.manual_seed(0)
    net = SeqFirst().eval()
    gen = torch.Generator().manual_seed(5)
    vectors = [{k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in net.state_dict().items()} for _ in range(3)]
    factors = ExpertFactors.build(iter(vectors), ["a", "b", "c"], eps=None)
    heads = [LinearHead(torch.randn(3, 8, generator=gen)) for _ in range(3)]
    pool = mean_pool(batch_first=False)
    model = MASSModel(net, factors, heads, make_serve_settings(routing_layers=("mlp",)), pool=pool)
    assert "sequence-first" in (model.batched_off_reason or "")
    x = torch.randn(6, 5, 6, generator=gen)  # B = 6, L = 5
    selected = mixed_selection([(0,), (1,), (0, 2), (1,), (2,), (0,)], tasks=3)
    groups = group_by_task_set(selected)
    feats = model.second_pass_features(x, groups)
    reference = model.with_settings(strategy="reference")
    for tasks, index in groups:
        expected = reference.second_pass_features(x[index], [(tasks, torch.arange(len(index)))])
        assert rel(feats[index], expected) < 1e-5
    with pytest.raises(OptionError, match="batched"):
        model.with_settings(strategy="batched").second_pass_features(x, groups)


def test_the_stage_clock_splits_a_served_call_into_its_stages():
    """MASSModel.timed: each stage's own seconds (set merges taken out of the second pass that made them), a new
    clock per block, and nothing timed outside one."""
    base, factors, heads, cfg = make_parts(4)
    model, batch = MASSModel(base, factors, heads, cfg, pool=mean_pool()), make_batch(12, seed=2)
    with model.timed() as seconds:
        model(batch)
    assert set(seconds) == {"first pass + router", "set merges", "second pass + heads"}
    assert all(value > 0 for value in seconds.values()), seconds
    with model.timed() as again:
        model(batch)  # its task sets are cached now: no set merge
    assert again["set merges"] == 0.0 and again["second pass + heads"] > 0
    frozen = dict(again)
    model(batch)
    assert again == frozen  # the clock stopped with its block
