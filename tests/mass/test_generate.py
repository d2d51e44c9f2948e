"""Routed generation (``MASSModel.generate``): route each prompt in the encoder, then HF ``generate()`` with every
prompt under its selected task set, token for token equal to a plain T5 holding the dense reference weights of
that prompt's set. Tiny random Flan-T5 replicas (width 16, 2 + 2 blocks), full and LoRA experts, mixed sets, padded
prompts, greedy and beams; sampling and streaming run; restart_block and options out of range are one line."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
import torch
from glue_fixtures import save_base, save_full_expert, save_lora_expert, widen

from massmerge.adapters import adapter_for, detect_family, family_of_model
from massmerge.adapters.seq2seq import (
    Seq2SeqAdapter,
    load_full_expert,
    load_lora_seq2seq,
    lora_seq2seq_factors,
    seq2seq_factors,
)
from massmerge.errors import OptionError
from massmerge.mass import MASSModel, make_serve_settings
from massmerge.mass.lru import LRU
from massmerge.task_vectors import CheckedTaskVector

transformers = pytest.importorskip("transformers")
TASKS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("t5gen")
    base = save_base(root / "base")
    for i, name in enumerate(TASKS):
        save_full_expert(base, root / f"full_{name}", 10 + i, scale=1.5)
        save_lora_expert(base, root / f"lora_{name}", 20 + i)
    return root


def mass_of(files: Path, kind: str, **settings) -> tuple[MASSModel, torch.nn.Module]:
    adapter = Seq2SeqAdapter()
    model = widen(adapter.load_model(str(files / "base")))
    plain = copy.deepcopy(model)
    if kind == "full":
        base = {k: v.detach().clone() for k, v in model.state_dict().items() if k in adapter.encoder_keys(model)}
        vectors = (CheckedTaskVector(base, load_full_expert(str(files / f"full_{t}"), model), name=t) for t in TASKS)
        factors = seq2seq_factors(vectors, TASKS, eps=None)
    else:
        experts = [load_lora_seq2seq(str(files / f"lora_{t}"), model, base="google/flan-t5-base") for t in TASKS]
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        factors = lora_seq2seq_factors(experts, TASKS, shapes, eps=None)
    adapter.bind(model)
    layer = adapter.routing_layer_for(model, factors.matrices)
    router = {**adapter.default_router(model, layer), "eta": 0.0, "top_k": 2, "tau": 0.05, **settings}
    return MASSModel(model, factors, [], make_serve_settings(**router), pool=adapter.pool,
                     features=adapter.features, blocks=adapter.block_names(model)), plain


def prompts(size: int, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(2, vocab, (size, 7), generator=gen)
    mask = torch.ones(size, 7, dtype=torch.long)
    for row in range(size):
        pad = row % 4
        if pad:
            ids[row, -pad:], mask[row, -pad:] = 0, 0
        ids[row, 6 - pad] = 1  # the end token before the padding
    return {"input_ids": ids, "attention_mask": mask}


def padded(tokens: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(tokens, (0, length - tokens.shape[1]), value=0)


def dense_generate(mass: MASSModel, plain: torch.nn.Module, tasks: tuple[int, ...], batch, options):
    rebuilt = copy.deepcopy(plain)
    state = mass.reference_state(tasks)
    rebuilt.load_state_dict(state, strict=False)
    return rebuilt.generate(**batch, **options)


def check_equal_to_dense(mass, plain, options, size=8):
    batch = prompts(size, plain.config.vocab_size)
    out = mass.generate(batch, **options)
    rows = [tuple(r.nonzero().flatten().tolist()) for r in out.routing.selected]
    assert len(set(rows)) > 1, rows  # a mixed batch
    n = options.get("num_return_sequences", 1)
    expected = {tasks: dense_generate(mass, plain, tasks, batch, options) for tasks in set(rows)}
    length = max(out.sequences.shape[1], *(e.shape[1] for e in expected.values()))
    for row, tasks in enumerate(rows):
        mine = padded(out.sequences, length)[row * n:(row + 1) * n]
        assert torch.equal(mine, padded(expected[tasks], length)[row * n:(row + 1) * n]), (row, tasks)
    return out, expected


GREEDY = {"max_new_tokens": 6, "do_sample": False}
BEAMS = {"max_new_tokens": 5, "do_sample": False, "num_beams": 3, "num_return_sequences": 2}


@pytest.fixture(scope="module")
def full(files):
    return mass_of(files, "full")


@pytest.fixture(scope="module")
def lora(files):
    return mass_of(files, "lora")


def test_the_seq2seq_row_detects_generating_t5_and_routes_at_the_official_layer(files, full) -> None:
    mass, plain = full
    assert detect_family(files / "base") == "seq2seq"
    assert family_of_model(plain) == "seq2seq"
    assert family_of_model(transformers.T5EncoderModel(copy.deepcopy(plain.config))) == "text"
    adapter = adapter_for(copy.deepcopy(plain))
    assert isinstance(adapter, Seq2SeqAdapter) and adapter.pooling == "mean"
    assert mass.settings.routing_layers == ("encoder.block.1.layer.0.SelfAttention.o",)


@pytest.mark.parametrize("options", [GREEDY, BEAMS], ids=["greedy", "beams"])
def test_full_experts_generate_each_prompts_dense_model_token_for_token(full, options) -> None:
    mass, plain = full
    _, expected = check_equal_to_dense(mass, plain, options)
    assert len({tuple(padded(e, 12)[0].tolist()) for e in expected.values()}) > 1  # the sets disagree somewhere


@pytest.mark.parametrize("path", ["per-set", "union-runs", "union-padded"])
@pytest.mark.parametrize("options", [GREEDY, BEAMS], ids=["greedy", "beams"])
def test_mixed_sets_generate_alike_set_by_set_and_through_the_union_of_their_tasks(full, path, options, monkeypatch
                                                                                  ) -> None:
    import massmerge.mass.second_pass as second

    monkeypatch.setattr(second, "READ_COST", 0 if path == "per-set" else 10**9)
    monkeypatch.setattr(second, "use_padded", lambda *_: path == "union-padded")
    check_equal_to_dense(*full, options)


@pytest.mark.parametrize("tasks", [(0, 2), (0, 1, 2)])
@pytest.mark.parametrize("options", [GREEDY, BEAMS], ids=["greedy", "beams"])
def test_one_set_of_several_tasks_for_every_prompt_generates_its_dense_model(full, tasks, options, monkeypatch
                                                                           ) -> None:
    """The whole-batch path: a set of non-adjacent or adjacent tasks for every row, its factor rows read as views
    in the prompt pass and gathered once for the decode steps (side branches only: no dense weight kept or
    bought, which the next test covers)."""
    import massmerge.mass.second_pass as second

    mass, plain = full
    monkeypatch.setattr(mass._shared, "kept", LRU(1))
    monkeypatch.setattr(second, "buy_dense", lambda *_: False)
    batch = prompts(4, plain.config.vocab_size)
    with mass.task_sets([tasks] * 4):
        mine = mass.model.generate(**batch, **options)
    expected = dense_generate(mass, plain, tasks, batch, options)
    length = max(mine.shape[1], expected.shape[1])
    assert torch.equal(padded(mine, length), padded(expected, length))


@pytest.mark.parametrize("options", [GREEDY, BEAMS], ids=["greedy", "beams"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_sets_stream_of_generate_calls_buys_its_dense_weights_and_stays_token_for_token(files, kind, options,
                                                                                         monkeypatch) -> None:
    """Rent or buy: a set's decode steps run side branches until they have cost what forming its dense weights
    costs, then the set's next steps and calls read those weights; every call equals the set's dense model, before,
    during and after. (Tiny matrices pay off within one call; the price is raised so the purchases spread over
    several calls, as flan-t5-base's do.)"""
    import massmerge.mass.second_pass as second

    price = second.dense_cost
    monkeypatch.setattr(second, "dense_cost", lambda rank, m, n: 40 * price(rank, m, n))
    mass, plain = mass_of(files, kind)
    linears = [key for key in mass.factors.matrices if key != "shared.weight"]
    batch = prompts(2, plain.config.vocab_size)
    expected = dense_generate(mass, plain, (0, 2), batch, options)
    kept = [0]
    while kept[-1] < len(linears) and len(kept) < 40:
        with mass.task_sets([(0, 2)] * 2):
            mine = mass.model.generate(**batch, **options)
        length = max(mine.shape[1], expected.shape[1])
        assert torch.equal(padded(mine, length), padded(expected, length)), kept
        weights = mass._shared.kept.peek(((0, 2), mass.settings.alpha))
        kept.append(0 if weights is None else len(weights))
    assert kept[-1] == len(linears), kept
    assert any(0 < count < len(linears) for count in kept), kept  # bought over several calls


@pytest.mark.parametrize("options", [GREEDY, {**BEAMS, "num_beams": 2}], ids=["greedy", "beams"])
def test_lora_experts_generate_each_prompts_dense_model_token_for_token(lora, options) -> None:
    check_equal_to_dense(*lora, options)


def test_masked_pooling_ignores_padding_and_the_unmasked_parity_pooling_does_not(full) -> None:
    mass, plain = full
    batch = prompts(2, plain.config.vocab_size)
    one = {k: v[1:2, :6] for k, v in batch.items()}  # row 1 without one of its padded positions
    def residuals(model, inputs, row):
        return torch.cat([r[row] for r in model.route(inputs).residuals.values()])

    assert torch.allclose(residuals(mass, one, 0), residuals(mass, batch, 1), atol=1e-5)
    unmasked = mass.with_settings(pooling="unmasked_mean")
    assert not torch.allclose(residuals(unmasked, one, 0), residuals(unmasked, batch, 1), atol=1e-3)


def test_sampling_runs_and_streaming_in_a_worker_thread_yields_the_greedy_text(full) -> None:
    mass, plain = full
    batch = prompts(3, plain.config.vocab_size)
    torch.manual_seed(0)
    sampled = mass.generate(batch, max_new_tokens=4, do_sample=True, temperature=0.7, top_p=0.9).sequences
    assert sampled.shape[0] == 3

    class Tok:  # what TextIteratorStreamer needs of a tokenizer
        def decode(self, ids, **_):
            return "".join(f"<{int(i)}>" for i in ids)

    one = {k: v[:1] for k, v in batch.items()}
    streamer = transformers.TextIteratorStreamer(Tok(), skip_prompt=False, timeout=60)
    worker = threading.Thread(target=mass.generate, args=(one,), kwargs={**GREEDY, "streamer": streamer})
    worker.start()
    text = "".join(streamer)
    worker.join()
    greedy = mass.generate(one, **GREEDY).sequences[0]
    assert text == Tok().decode(greedy)


def test_restart_block_and_options_out_of_range_are_one_line(full) -> None:
    mass, plain = full
    batch = prompts(2, plain.config.vocab_size)
    with pytest.raises(OptionError, match=r"^--restart-block 1: generation runs a decode step per token"):
        mass.with_settings(restart_block=1).generate(batch, **GREEDY)
    for bad, flag in (({"num_beams": 0}, "--num-beams"), ({"max_new_tokens": 0}, "--max-new-tokens"),
                      ({"top_p": 1.5, "do_sample": True}, "--top-p"), ({"temperature": 0.0}, "--temperature")):
        with pytest.raises(OptionError, match=f"^{flag}: ") as info:
            mass.generate(batch, **bad)
        assert "\n" not in str(info.value)
    with pytest.raises(OptionError, match="^generate: ") as info:
        mass.generate(batch, max_new_tokens=2, num_beams=2, num_return_sequences=3)
    assert "\n" not in str(info.value)
    with pytest.raises(OptionError, match="no class heads"):
        mass(batch)
