"""SMILE (massmerge.smile.build_smile) on a tiny random T5ForConditionalGeneration: every encoder, decoder and
LM-head Linear upscaled and equal, token by token, to the slow reference of tests/test_smile.py; everything else
the base's; greedy ``generate()`` equal to a greedy loop of full forwards (the KV cache path routes each new token
as the full forward does)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from massmerge.smile import SmileLinear, SmileSettings, build_smile
from massmerge.task_vectors import task_vector
from tests.glue_fixtures import t5_config
from tests.test_smile import reference_token

VOCAB = 99


def tiny_t5(seed: int = 0, **changes) -> nn.Module:
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    return T5ForConditionalGeneration(t5_config(VOCAB, **changes)).eval()


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def expert_vector(base: nn.Module, seed: int, scale: float = 0.3, linears_only: bool = False) -> dict:
    """A random dense change of every tensor (``linears_only``: of every Linear weight), as a task vector."""
    gen = torch.Generator().manual_seed(seed)
    weights = {f"{name}.weight" for name in linear_names(base)}
    state = base.state_dict()
    expert = {}
    for key, value in state.items():
        change = not linears_only or key in weights
        noise = torch.randn(value.shape, generator=gen) * scale * value.abs().mean()
        expert[key] = value + noise if change else value.clone()
    return task_vector(state, expert)


def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(2, VOCAB, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded prompt
    return {"input_ids": ids, "attention_mask": mask,
            "decoder_input_ids": torch.randint(2, VOCAB, (2, 5), generator=gen)}


def test_every_linear_is_upscaled_and_matches_the_per_token_reference() -> None:
    base = tiny_t5()
    vectors = [expert_vector(base, 100 + i) for i in range(3)]
    settings = SmileSettings(k=4, gate_k=2, top_k=2)
    model = build_smile(base, vectors, settings)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SmileLinear)}
    assert sorted(layers) == sorted(linear_names(base))  # encoder, decoder (self + cross attention), lm_head
    assert "lm_head" in layers and any(".EncDecAttention.q" in n for n in layers)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen.setdefault(name, (args[0], out))
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in layers.items()]
    with torch.no_grad():
        model(**inputs())
    for hook in hooks:
        hook.remove()
    assert sorted(seen) == sorted(layers)
    base_modules = dict(base.named_modules())
    for name, (x, out) in seen.items():
        plain = base_modules[name]
        deltas = [tv[f"{name}.weight"] for tv in vectors]
        tokens, outs = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        for t in range(0, tokens.shape[0], 3):  # every third token of every layer: the reference is slow
            want = reference_token(tokens[t], plain, deltas, [None] * 3, k=4, gate_k=2, top_k=2)
            torch.testing.assert_close(outs[t].double(), want, atol=2e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # everything that is not a Linear stays the base's (FusionBench's average_experts: false)
    smile_state, base_state = model.state_dict(), base.state_dict()
    for key in ("shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                "decoder.final_layer_norm.weight", "encoder.block.1.layer.1.layer_norm.weight"):
        assert torch.equal(smile_state[key], base_state[key])


def test_one_expert_at_full_rank_is_that_expert_end_to_end() -> None:
    """T = 1, k = the full rank: each Linear is W0 + (W1 - W0) exactly, so logits and greedy text are the
    expert's (its change is only in Linear weights, the part SMILE carries)."""
    from transformers import T5ForConditionalGeneration

    base = tiny_t5()
    vector = expert_vector(base, 5, linears_only=True)
    expert = T5ForConditionalGeneration(base.config).eval()
    expert.load_state_dict({k: v + vector[k] for k, v in base.state_dict().items()})
    model = build_smile(base, [vector], SmileSettings(k=32, gate_k=1, top_k=1))
    batch = inputs()
    with torch.no_grad():
        ours, theirs, plain = (m(**batch).logits for m in (model, expert, base))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert float((theirs - plain).abs().max()) > 1e-2  # the expert is not the base
    prompt = {k: v for k, v in batch.items() if k != "decoder_input_ids"}
    assert torch.equal(model.generate(**prompt, max_length=8, do_sample=False),
                       expert.generate(**prompt, max_length=8, do_sample=False))


def greedy_by_hand(model: nn.Module, prompt: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Greedy decoding by full forwards (no cache), each step the argmax of the last position."""
    out = torch.full((prompt["input_ids"].shape[0], 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(**prompt, decoder_input_ids=out).logits[:, -1]
            out = torch.cat([out, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return out


def test_greedy_generate_routes_every_decode_step_as_a_full_forward() -> None:
    base = tiny_t5(3)
    vectors = [expert_vector(base, 200 + i) for i in range(4)]
    model = build_smile(base, vectors)  # the defaults: SMILE-2, the MASS rank rule
    assert all(m.top_k == 2 for m in model.modules() if isinstance(m, SmileLinear))
    prompt = {k: v for k, v in inputs().items() if k != "decoder_input_ids"}
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1)
    assert torch.equal(generated, greedy_by_hand(model, prompt, 6))
    assert not torch.equal(generated, base.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False))


def test_a_lm_head_tied_to_the_embedding_is_upscaled_from_the_embedding_delta() -> None:
    """T5 v1.0 ties the head to ``shared.weight``: the task vectors hold it once, under the embedding's name."""
    base = tiny_t5()
    base.config.tie_word_embeddings = True
    base.lm_head.weight = base.shared.weight
    assert base.lm_head.weight is base.shared.weight
    tied = {"lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    vectors = [{k: v for k, v in expert_vector(base, 300 + i).items() if k not in tied} for i in range(2)]
    model = build_smile(base, vectors, SmileSettings(k=4, gate_k=2, top_k=1))
    head = model.lm_head
    assert isinstance(head, SmileLinear) and head.base.weight is model.shared.weight
    delta = vectors[0]["shared.weight"]
    torch.testing.assert_close(head.U[0] @ head.SV[0].T, _rank(delta, 4), atol=1e-5, rtol=1e-5)


def _rank(matrix: torch.Tensor, k: int) -> torch.Tensor:
    U, s, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (U[:, :k] * s[:k] @ Vh[:k]).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_half_precision_base_keeps_its_dtype(dtype: torch.dtype) -> None:
    """T5's FFN casts its input to ``wo.weight.dtype``: the SMILE layer shows the base's weight, in its dtype."""
    base = tiny_t5()
    vectors = [expert_vector(base, 400 + i) for i in range(2)]
    model = build_smile(base.to(dtype), vectors, SmileSettings(top_k=1))
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, SmileLinear) and wo.weight.dtype == dtype and wo.U_all.dtype == dtype
    prompt = {k: v for k, v in inputs().items() if k != "decoder_input_ids"}
    with torch.no_grad():
        assert model.generate(**prompt, max_new_tokens=3, do_sample=False).shape[0] == 2


def test_lora_experts_upscale_their_matrices_as_the_merged_adapter(tmp_path) -> None:
    """LoRA experts (PEFT, q and v) as the SMILE row reads them (``LoraDeltas``: dense ``scale B A`` per adapted
    matrix): only q and v are upscaled, and with T = 1 at the adapter's rank the model is PEFT's
    ``merge_and_unload()`` of the adapter, which is how FusionBench loads a LoRA expert before upscaling."""
    from peft import PeftModel
    from transformers import T5ForConditionalGeneration

    from massmerge.adapters.seq2seq import load_lora_seq2seq
    from massmerge.experiments.generation_eval import LoraDeltas
    from tests.glue_fixtures import BASE_ID, LORA_RANK, save_base, save_lora_expert

    base_dir = save_base(tmp_path / "base")
    adapters = [save_lora_expert(base_dir, tmp_path / f"lora{i}", 20 + i) for i in range(2)]
    base = T5ForConditionalGeneration.from_pretrained(base_dir).eval()
    experts = [load_lora_seq2seq(str(p), base, base=BASE_ID) for p in adapters]
    two = build_smile(base, [LoraDeltas(e) for e in experts], SmileSettings(k=2, gate_k=1, top_k=1))
    upscaled = {name.rsplit(".", 1)[-1] for name, m in two.named_modules() if isinstance(m, SmileLinear)}
    assert upscaled == {"q", "v"}
    one = build_smile(base, [LoraDeltas(experts[0])], SmileSettings(k=LORA_RANK, gate_k=1, top_k=1))
    merged = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(base_dir), str(adapters[0]))
    merged = merged.merge_and_unload().eval()
    batch = {k: v % base.config.vocab_size for k, v in inputs().items()}
    with torch.no_grad():
        ours, theirs, plain = (m(**batch).logits for m in (one, merged, base))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)  # float32 rounding through 4 blocks: ~2e-5
    assert float((theirs - plain).abs().max()) > 1e-2
