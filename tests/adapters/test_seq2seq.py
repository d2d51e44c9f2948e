"""The seq2seq family (T5ForConditionalGeneration): tied weights once, encoder and decoder factored, relative
biases and norms as non-matrix deltas, exact LoRA factors against PEFT's own merge, one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from glue_fixtures import save_base, save_full_expert, save_lora_expert

from massmerge.adapters.seq2seq import (
    Seq2SeqAdapter,
    is_factored,
    load_full_expert,
    load_lora_seq2seq,
    lora_seq2seq_factors,
    seq2seq_factors,
    tied_aliases,
)
from massmerge.errors import CheckpointError
from massmerge.task_vectors import CheckedTaskVector


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("t5")
    base = save_base(root / "base")
    save_full_expert(base, root / "e1", 1)
    save_full_expert(base, root / "e2", 2)
    save_lora_expert(base, root / "l1", 3)
    save_lora_expert(base, root / "l2", 4)
    return root


def test_keys_ties_and_routing_layer(files: Path) -> None:
    adapter = Seq2SeqAdapter()
    model = adapter.load_model(str(files / "base"))
    aliases = tied_aliases(model)
    assert aliases == {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    assert model.lm_head.weight is not model.shared.weight
    keys = adapter.encoder_keys(model)
    assert "lm_head.weight" in keys and "shared.weight" in keys  # flan-t5: the LM head is not tied
    assert not set(aliases) & set(keys)
    assert any(k.startswith("decoder.block.1.layer.1.EncDecAttention") for k in keys)
    assert adapter.routing_layer(model) == "encoder.block.1.layer.0.SelfAttention.o"  # 10/12 of 2 blocks, clipped
    state = model.state_dict()
    assert not is_factored("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                           state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])
    assert is_factored("decoder.block.0.layer.2.DenseReluDense.wi_0.weight",
                       state["decoder.block.0.layer.2.DenseReluDense.wi_0.weight"])


def test_full_experts_factor_encoder_and_decoder(files: Path) -> None:
    adapter = Seq2SeqAdapter()
    model = adapter.load_model(str(files / "base"))
    base = {k: v.detach().clone() for k, v in model.state_dict().items() if k in adapter.encoder_keys(model)}
    vectors = [CheckedTaskVector(base, load_full_expert(str(files / e), model), name=e) for e in ("e1", "e2")]
    factors = seq2seq_factors(vectors, ["a", "b"], rank_fraction=1.0, eps=None)
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in factors.matrices
    assert "decoder.block.1.layer.2.DenseReluDense.wo.weight" in factors.matrices
    assert "lm_head.weight" in factors.matrices and "shared.weight" in factors.matrices
    rel = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert rel in factors.non_matrix and "decoder.final_layer_norm.weight" in factors.non_matrix
    torch.testing.assert_close(factors.non_matrix[rel][0], vectors[0][rel].float())
    key = "decoder.block.0.layer.1.EncDecAttention.v.weight"
    f = factors.matrices[key][1]
    torch.testing.assert_close(f.U @ torch.diag(f.s) @ f.V.T, vectors[1][key].float(), atol=1e-5, rtol=1e-4)


def test_lora_factors_equal_peft_merge(files: Path) -> None:
    from peft import PeftModel
    from transformers import T5ForConditionalGeneration

    adapter = Seq2SeqAdapter()
    model = adapter.load_model(str(files / "base"))
    experts = [load_lora_seq2seq(str(files / n), model, base="google/flan-t5-base") for n in ("l1", "l2")]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    factors = lora_seq2seq_factors(experts, ["a", "b"], shapes, rank_fraction=1.0, eps=None)
    assert {k.split(".")[0] for k in factors.matrices} == {"encoder", "decoder"}
    assert all(k.endswith(("q.weight", "v.weight")) for k in factors.matrices)
    merged = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(files / "base"), files / "l1")
    merged = merged.merge_and_unload().state_dict()
    for key, per_task in factors.matrices.items():
        f = per_task[0]
        torch.testing.assert_close(f.U @ torch.diag(f.s) @ f.V.T, merged[key] - model.state_dict()[key],
                                   atol=1e-5, rtol=1e-4)


def test_bad_experts_are_one_line(files: Path, tmp_path: Path) -> None:
    adapter = Seq2SeqAdapter()
    model = adapter.load_model(str(files / "base"))
    wide = save_full_expert(files / "base", tmp_path / "wide", 5, feed_forward_proj="relu")
    with pytest.raises(CheckpointError, match="field 'feed_forward_proj' is 'relu', the base has 'gated-gelu'") as info:
        load_full_expert(str(wide), model)
    assert "\n" not in str(info.value)
    other = save_lora_expert(files / "base", tmp_path / "other", 6, base_id="t5-small")
    with pytest.raises(CheckpointError, match="'base_model_name_or_path' is 't5-small'"):
        load_lora_seq2seq(str(other), model, base="google/flan-t5-base")
    raw = json.loads((files / "l1" / "adapter_config.json").read_text())
    for field, value, message in [("target_modules", ["query"], "target module 'query' matches no layer"),
                                  ("task_type", "SEQ_CLS", "'task_type' is 'SEQ_CLS'")]:
        folder = tmp_path / field
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes((files / "l1" / "adapter_model.safetensors").read_bytes())
        (folder / "adapter_config.json").write_text(json.dumps({**raw, field: value}))
        with pytest.raises(CheckpointError, match=message):
            load_lora_seq2seq(str(folder), model, base="google/flan-t5-base")
