"""PEFT LoRA experts: task vector = scale * B @ A, factorized without densifying, checked against dense math
and against PEFT's own merge; LoRA experts feed a working MASS model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import bert_config

from massmerge.adapters import TextEncoderAdapter
from massmerge.adapters.lora import build_lora_factors, load_lora_expert, lora_scale, lowrank_from_lora
from massmerge.errors import CheckpointError
from massmerge.heads import LinearHead
from massmerge.mass import MASSModel, make_serve_settings

TARGETS = ["query", "value", "intermediate.dense"]


def _save_peft_adapter(path: Path, seed: int, **lora_options) -> None:  # noqa: ANN003
    """A real PEFT adapter on a tiny BertForSequenceClassification, with nonzero (random) B."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    torch.manual_seed(100)  # same base weights for every adapter
    model = BertForSequenceClassification(bert_config())
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["classifier"], **lora_options)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(str(path))


def _base():  # noqa: ANN202
    from transformers import BertForSequenceClassification

    torch.manual_seed(100)
    return BertForSequenceClassification(bert_config()).eval()


def test_qr_factors_equal_the_svd_of_the_dense_product() -> None:
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 40, generator=gen, dtype=torch.float64), torch.randn(24, 6, generator=gen, dtype=torch.float64)
    dense = 0.5 * B @ A
    full = lowrank_from_lora(A, B, 0.5, dtype=torch.float64)
    torch.testing.assert_close(full.reconstruct(), dense)
    torch.testing.assert_close(full.s, torch.linalg.svdvals(dense)[:6])
    top2 = lowrank_from_lora(A, B, 0.5, k=2, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(dense)
    torch.testing.assert_close(top2.reconstruct(), (u[:, :2] * s[:2]) @ vh[:2])
    torch.testing.assert_close(top2.U.T @ top2.U, torch.eye(2, dtype=torch.float64))
    transposed = lowrank_from_lora(A, B, 0.5, transpose=True, dtype=torch.float64)
    torch.testing.assert_close(transposed.reconstruct(), dense.T)


def test_task_vector_matches_peft_merge(tmp_path: Path) -> None:
    _save_peft_adapter(tmp_path / "lora", seed=1)
    base = _base()
    before = {k: v.clone() for k, v in base.bert.state_dict().items()}
    expert = load_lora_expert(tmp_path / "lora", list(before))
    assert len(expert.pairs) == 3 * 4 and set(expert.head_state) == {"classifier.weight", "classifier.bias"}
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base, str(tmp_path / "lora")).merge_and_unload().bert.state_dict()
    for key in expert.pairs:
        torch.testing.assert_close(expert.dense(key), merged[key] - before[key], atol=1e-5, rtol=1e-4)
        assert expert.factors()[key].rank == 4
    dense_tv = expert.task_vector(before)
    assert torch.count_nonzero(dense_tv["embeddings.word_embeddings.weight"]) == 0


def test_scaling_rules() -> None:
    config = {"lora_alpha": 16, "alpha_pattern": {"value": 4}}
    assert lora_scale(config, "encoder.layer.0.attention.self.query", 8) == 2.0
    assert lora_scale(config, "encoder.layer.0.attention.self.value", 8) == 0.5
    assert lora_scale({"lora_alpha": 16, "use_rslora": True}, "q", 4) == 8.0


def test_fan_in_fan_out_and_dora(tmp_path: Path) -> None:
    folder = tmp_path / "gpt2_style"
    folder.mkdir()
    A, B = torch.randn(2, 5), torch.randn(3, 2)
    save_file({"base_model.model.h.0.attn.c_attn.lora_A.weight": A, "base_model.model.h.0.attn.c_attn.lora_B.weight": B},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "fan_in_fan_out": True}))
    expert = load_lora_expert(folder, ["h.0.attn.c_attn.weight"])
    torch.testing.assert_close(expert.dense("h.0.attn.c_attn.weight"), (B @ A).T)
    torch.testing.assert_close(expert.factors()["h.0.attn.c_attn.weight"].reconstruct(), (B @ A).T, atol=1e-5, rtol=1e-5)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA"):
        load_lora_expert(folder, ["h.0.attn.c_attn.weight"])
    with pytest.raises(CheckpointError, match="matches no parameter"):
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
        load_lora_expert(folder, ["encoder.layer.0.weight"])


def test_lora_experts_feed_mass(tmp_path: Path) -> None:
    """Two LoRA experts -> ExpertFactors without dense task vectors -> a MASS model that runs and routes."""
    for seed in (1, 2):
        _save_peft_adapter(tmp_path / f"lora{seed}", seed=seed)
    encoder = _base().bert
    adapter = TextEncoderAdapter(feature_pooling="pooler").bind(encoder)
    state = encoder.state_dict()
    experts = [load_lora_expert(tmp_path / f"lora{s}", list(state)) for s in (1, 2)]
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    factors = build_lora_factors(experts, ["a", "b"], shapes, eps=None)
    layer = adapter.routing_layer(encoder)
    assert f"{layer}.weight" in factors.matrices
    assert factors.matrices[f"{layer}.weight"][0].rank == 4  # min(LoRA rank, floor(32 / 2))
    heads = [LinearHead(e.head_state["classifier.weight"], e.head_state["classifier.bias"]) for e in experts]
    model = MASSModel(encoder, factors, heads, make_serve_settings(routing_layers=(layer,)), pool=adapter.pool, features=adapter.features)
    ids = torch.randint(2, 99, (5, 7))
    out = model({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert out.task.shape == (5,) and out.probs.shape == (5, 2)
    oracle = model({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, task=1)
    assert bool((oracle.task == 1).all())
