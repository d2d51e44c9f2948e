"""The public seam, ``with model.task_sets(rows): ...``: any forward or ``generate()`` of the served module with
each row under its own task set, against a dense per-set rebuild (the reference weights loaded into a plain copy
of the base) on mixed batches with padding: tiny BERT and CLIP forwards, and a tiny random T5 generating greedily
and with beams (token for token). Threads: an explicit hand-off and ``contextvars.copy_context()``.
``restart_block`` is refused where a second forward would run past the prompt."""

from __future__ import annotations

import contextvars
import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from massmerge.errors import OptionError
from massmerge.heads import LinearHead
from massmerge.mass import ExpertFactors, MASSModel, make_serve_settings, mean_pool

transformers = pytest.importorskip("transformers")

ROWS = [(0,), (1, 2), (0,), (2,), (0, 1, 2), (1, 2)]  # interleaved: the seam keeps the caller's row order


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def mass_of(model: torch.nn.Module, routing_layer: str, width: int, seed: int, scale: float = 0.05, features=None,
            **settings) -> tuple[MASSModel, torch.nn.Module]:
    """A MASS model over ``model`` (float64, 3 random experts on every floating tensor, tied ones once) and a
    plain copy of the base taken before the routed modules were installed."""
    from massmerge.adapters.base import untied_keys

    model = model.double().eval()
    plain = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    keys = [k for k in untied_keys(model) if state[k].is_floating_point()]
    vectors = [{k: scale * torch.randn(state[k].shape, generator=gen, dtype=torch.float64) for k in keys}
               for _ in range(3)]
    factors = ExpertFactors.build(iter(vectors), ["a", "b", "c"], eps=0.3, dtype=torch.float64)
    heads = [LinearHead(torch.randn(3, width, generator=gen, dtype=torch.float64)) for _ in range(3)]
    settings = make_serve_settings(routing_layers=(routing_layer,), **settings)
    extra = {} if features is None else {"features": features}
    return MASSModel(model, factors, heads, settings, **extra), plain


def dense(mass: MASSModel, plain: torch.nn.Module, tasks: tuple[int, ...]) -> torch.nn.Module:
    """A plain copy of the base holding the reference weights of ``tasks`` (tied tensors follow their first name)."""
    rebuilt = copy.deepcopy(plain)
    rebuilt.load_state_dict(mass.reference_state(tasks), strict=False)
    return rebuilt


def per_set(rows, run) -> dict[tuple[int, ...], object]:
    return {tasks: run(tasks) for tasks in sorted(set(rows))}


# ----- encoders: BERT (embeddings, LayerNorm, padding) and CLIP (class token and conv owner) ---------------------

@pytest.fixture(scope="module")
def bert():
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    return mass_of(transformers.BertModel(config, add_pooling_layer=False), "encoder.layer.1.intermediate.dense",
                   16, 1)


def bert_batch(size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 50, (size, 7), generator=gen)
    mask = torch.ones(size, 7, dtype=torch.long)
    for row in range(size):
        if row % 3:
            ids[row, -(row % 3):], mask[row, -(row % 3):] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def test_bert_forward_under_mixed_task_sets_is_each_rows_dense_model(bert) -> None:
    mass, plain = bert
    batch = bert_batch(len(ROWS))
    with mass.task_sets(ROWS):
        got = mass.model(**batch).last_hidden_state
    expected = per_set(ROWS, lambda tasks: dense(mass, plain, tasks)(**batch).last_hidden_state)
    mask = batch["attention_mask"].bool()
    for row, tasks in enumerate(ROWS):
        assert rel(got[row][mask[row]], expected[tasks][row][mask[row]]) < 1e-10, (row, tasks)
    assert rel(got[1], plain(**batch).last_hidden_state[1]) > 1e-3  # the sets really change the output
    assert torch.equal(mass.model(**batch).last_hidden_state, plain(**batch).last_hidden_state)  # outside: the base


def test_the_seam_takes_routing_masks_and_task_names(bert) -> None:
    mass, _ = bert
    batch = bert_batch(3)
    selected = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    with mass.task_sets(selected):
        by_mask = mass.model(**batch).last_hidden_state
    with mass.task_sets(["a", ("b", "c"), ("a", "b", "c")]):
        by_name = mass.model(**batch).last_hidden_state
    assert torch.equal(by_mask, by_name)
    with pytest.raises(OptionError, match="unknown task 'z'"):
        mass.task_sets(["z"])
    with pytest.raises(OptionError, match="row 1 selects no task"):
        mass.task_sets(torch.tensor([[1, 0, 0], [0, 0, 0]]))


@pytest.fixture(scope="module")
def clip():
    config = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(0)
    return mass_of(transformers.CLIPVisionModel(config), "encoder.layers.1.mlp.fc1", 16, 2)


def test_clip_forward_under_mixed_task_sets_is_each_rows_dense_model(clip) -> None:
    mass, plain = clip
    pixels = torch.randn(len(ROWS), 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with mass.task_sets(ROWS):
        got = mass.model(pixel_values=pixels).pooler_output
    expected = per_set(ROWS, lambda tasks: dense(mass, plain, tasks)(pixel_values=pixels).pooler_output)
    for row, tasks in enumerate(ROWS):
        assert rel(got[row], expected[tasks][row]) < 1e-10, (row, tasks)


# ----- a tiny random T5 that generates: encoder rows B, decoder rows B * beams ----------------------------------

@pytest.fixture(scope="module")
def t5():
    from massmerge.adapters import families  # noqa: F401 - declares T5's scale-only norm kernel

    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # T5's own init generates the pad token everywhere: wider matrices give varied tokens
        for param in model.parameters():
            if param.ndim == 2:
                param.copy_(0.6 * torch.randn(param.shape, generator=gen))
    return mass_of(model, "encoder.block.1.layer.1.DenseReluDense.wi", 16, 5, scale=0.15)


def prompts(size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(2, 40, (size, 6), generator=gen)
    mask = torch.ones(size, 6, dtype=torch.long)
    for row in range(size):
        if row % 3:
            ids[row, -(row % 3):], mask[row, -(row % 3):] = 0, 0
    ids[:, 5 - torch.arange(size) % 3] = 1  # an end token before the padding
    return {"input_ids": ids, "attention_mask": mask}


def padded(tokens: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(tokens, (0, length - tokens.shape[1]), value=0)


GENERATE = {"greedy": {"max_new_tokens": 5, "do_sample": False},
            "beams": {"max_new_tokens": 5, "do_sample": False, "num_beams": 3, "num_return_sequences": 2}}


@pytest.mark.parametrize("mode", list(GENERATE))
def test_t5_generate_under_mixed_task_sets_is_each_rows_dense_model_token_for_token(t5, mode) -> None:
    from massmerge.mass.routed import RoutedRelativeBias, RoutedScaleNorm

    mass, plain = t5
    assert isinstance(mass.model.encoder.block[0].layer[0].SelfAttention, RoutedRelativeBias)
    assert isinstance(mass.model.encoder.final_layer_norm, RoutedScaleNorm)
    batch, options = prompts(len(ROWS)), GENERATE[mode]
    with mass.task_sets(ROWS):
        got = mass.model.generate(**batch, **options)
    n = options.get("num_return_sequences", 1)
    expected = per_set(ROWS, lambda tasks: dense(mass, plain, tasks).generate(**batch, **options))
    length = max(got.shape[1], *(e.shape[1] for e in expected.values()))
    for row, tasks in enumerate(ROWS):
        mine = padded(got, length)[row * n:(row + 1) * n]
        assert torch.equal(mine, padded(expected[tasks], length)[row * n:(row + 1) * n]), (mode, row, tasks)
    assert len({tuple(t.tolist()) for t in padded(got, length)}) > 1
    assert len({tuple(padded(e, length)[0].tolist()) for e in expected.values()}) > 1  # the sets disagree somewhere


def test_t5_encoder_logits_match_for_mixed_sets(t5) -> None:
    """Below the argmax: one teacher-forced forward, logits per row against the dense rebuild."""
    mass, plain = t5
    batch = prompts(len(ROWS))
    labels = torch.randint(2, 40, (len(ROWS), 4), generator=torch.Generator().manual_seed(7))
    with mass.task_sets(ROWS):
        got = mass.model(**batch, labels=labels).logits
    expected = per_set(ROWS, lambda tasks: dense(mass, plain, tasks)(**batch, labels=labels).logits)
    for row, tasks in enumerate(ROWS):
        assert rel(got[row], expected[tasks][row]) < 1e-10, (row, tasks)


def test_the_context_follows_an_explicit_hand_off_and_a_copied_context_into_worker_threads(t5) -> None:
    """HF's TextIteratorStreamer runs generate in a Thread, which a ContextVar does not follow: the seam is handed
    over (``sets.run``), or a ``copy_context()`` taken inside the block runs in the worker."""
    mass, plain = t5
    batch = prompts(len(ROWS))
    sets = mass.task_sets(ROWS)
    with sets:
        inline = mass.model.generate(**batch, **GENERATE["greedy"])
        copied = contextvars.copy_context()
    out: dict[str, torch.Tensor] = {}
    worker = threading.Thread(target=lambda: out.update(handed=sets.run(mass.model.generate, **batch,
                                                                        **GENERATE["greedy"])))
    worker.start()
    worker.join()
    with ThreadPoolExecutor(1) as pool:
        in_context = pool.submit(copied.run, mass.model.generate, **batch, **GENERATE["greedy"]).result()
        bare = pool.submit(mass.model.generate, **batch, **GENERATE["greedy"]).result()
    assert torch.equal(out["handed"], inline) and torch.equal(in_context, inline)
    assert torch.equal(bare, plain.generate(**batch, **GENERATE["greedy"]))  # no hand-off: the base model


@pytest.mark.parametrize("norm_kernel", [True, False])
def test_the_engine_on_a_t5_encoder_uses_each_sets_relative_bias_and_embedding_even_when_length_is_batch(
        norm_kernel, monkeypatch) -> None:
    """The engine's own mixed second pass on a T5 encoder: the relative-bias table (indexed by [q, k] positions,
    no batch) is computed per set, and the tied embedding (``shared`` is ``encoder.embed_tokens``) is merged, with a
    sequence as long as the batch (where reading positions as rows went unnoticed). Without the scale-norm kernel
    T5's norms take the generic path, exact too."""
    from massmerge.adapters import families  # noqa: F401 - declares T5's scale-only norm kernel
    from massmerge.mass import routed
    from massmerge.mass.batch import group_by_task_set, index_batch

    if not norm_kernel:
        monkeypatch.setattr(routed, "SCALE_NORMS", set())

    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                   dropout_rate=0.0)
    torch.manual_seed(0)
    mass, _ = mass_of(transformers.T5EncoderModel(config), "encoder.block.1.layer.1.DenseReluDense.wi", 16, 8,
                      features=lambda model, batch: model(**batch).last_hidden_state.mean(1))
    assert mass.batched_off_reason is None
    assert isinstance(mass.model.encoder.final_layer_norm, routed.RoutedScaleNorm) == norm_kernel
    batch = prompts(len(ROWS))
    assert batch["input_ids"].shape == (6, 6)  # length == batch size
    selected = torch.zeros(len(ROWS), 3, dtype=torch.bool)
    for row, tasks in enumerate(ROWS):
        selected[row, list(tasks)] = True
    groups = group_by_task_set(selected)
    got = mass.second_pass_features(batch, groups)
    assert mass.batched_off_reason is None  # one forward, no fallback
    reference = mass.with_settings(strategy="reference")
    for tasks, index in groups:
        expected = reference.features_with(tasks, index_batch(batch, index))
        assert rel(got[index], expected) < 1e-10, tasks


def test_a_sequence_first_model_takes_one_task_set_per_call_and_refuses_a_mix_in_one_line() -> None:
    from toy_mass import make_batch, make_parts

    base, factors, heads, settings = make_parts(3)
    base.batch_first = False  # declares [L, B, D] tensors: rows cannot be read from dim 0
    mass = MASSModel(base, factors, heads, settings)
    batch = make_batch(4)
    with mass.task_sets([(0, 1)] * 4):
        one = mass.model(batch)
    assert torch.allclose(one, mass.features_with((0, 1), batch), atol=1e-6)
    with pytest.raises(OptionError, match=r"task_sets: this model cannot run mixed task sets in one forward "
                                          r"\(module '.*' is sequence-first"):
        mass.task_sets([(0,), (1,), (0,), (2,)])


# ----- restart_block: the prompt's one forward, never a second ----------------------------------------------------

def test_restart_block_is_refused_when_a_second_forward_would_run_past_the_prompt(bert) -> None:
    mass, _ = bert
    restarting = MASSModel(mass.model, mass.factors, mass.heads, mass.settings.updated(restart_block=1),
                           pool=mean_pool(), blocks=["encoder.layer.0", "encoder.layer.1"])
    batch = bert_batch(4)
    routing = restarting.route(batch)
    with restarting.task_sets(routing.selected, batch=batch, restart=routing.restart):
        first = restarting.model(**batch).last_hidden_state
        with pytest.raises(OptionError, match="restart_block 1: a second forward under the same task sets"):
            restarting.model(**batch)
    assert first.shape == (4, 7, 16)
    with restarting.task_sets(routing.selected):  # without the prompt's states: from the embeddings, any number
        restarting.model(**batch)
        restarting.model(**batch)
