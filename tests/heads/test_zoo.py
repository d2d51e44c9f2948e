"""Shipped CLIP task metadata and head builders (zero-shot from templates, linear from a classifier)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from massmerge.errors import CheckpointError, OptionError
from massmerge.heads.zoo import (
    benchmark_tasks,
    clip_task,
    clip_tasks,
    clip_zero_shot_heads,
    linear_head_from_state,
    zero_shot_head,
)

EXPECTED_CLASSES = {
    "SUN397": 397, "Cars": 196, "RESISC45": 45, "EuroSAT": 10, "SVHN": 10, "GTSRB": 43, "MNIST": 10, "DTD": 47,
    "Flowers102": 102, "PCAM": 2, "FER2013": 7, "OxfordIIITPet": 37, "STL10": 10, "CIFAR100": 100, "CIFAR10": 10,
    "Food101": 101, "FashionMNIST": 10, "EMNIST": 10, "KMNIST": 10, "RenderedSST2": 2,
}


def test_the_20_tasks_are_shipped_with_their_class_counts() -> None:
    tasks = clip_tasks()["tasks"]
    assert {name: len(t["classnames"]) for name, t in tasks.items()} == EXPECTED_CLASSES
    for name, task in tasks.items():
        assert len(set(task["classnames"])) == len(task["classnames"]), name
        assert task["templates"] and all("{}" in t for t in task["templates"]), name
    assert benchmark_tasks(8) == ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
    assert len(benchmark_tasks(14)) == 14 and benchmark_tasks(20) == list(EXPECTED_CLASSES)
    with pytest.raises(OptionError):
        benchmark_tasks(12)


def test_task_lookup_ignores_case_and_punctuation() -> None:
    assert clip_task("oxford-iiit-pet") is clip_task("OxfordIIITPet")
    assert clip_task("eurosat")["classnames"][0] == "annual crop land"
    with pytest.raises(OptionError, match="no shipped class names"):
        clip_task("imagenet-r")


def _fake_encoder(texts: list[str]) -> torch.Tensor:
    """Deterministic text 'embedding': character histogram (enough to make prompts differ)."""
    out = torch.zeros(len(texts), 128)
    for row, text in enumerate(texts):
        for ch in text:
            out[row, ord(ch) % 128] += 1.0
    return out


def test_zero_shot_head_is_mean_of_normalized_prompt_embeddings() -> None:
    templates = ["a photo of a {}.", "a blurry photo of a {}."]
    head = zero_shot_head(_fake_encoder, ["cat", "dog"], templates, logit_scale=50.0)
    expected = F.normalize(F.normalize(_fake_encoder(["a photo of a dog.", "a blurry photo of a dog."]), dim=-1).mean(0), dim=0)
    torch.testing.assert_close(head.weight[1], expected)
    x = torch.randn(3, 128)
    torch.testing.assert_close(head(x), 50.0 * F.normalize(x, dim=-1) @ head.weight.T)
    heads = clip_zero_shot_heads(_fake_encoder, ["EuroSAT", "custom"],
                                 overrides={"custom": {"classnames": ["a", "b", "c"], "templates": ["{}"]}})
    assert [h.num_classes for h in heads] == [10, 3]


def test_linear_head_from_classifier_keys() -> None:
    state = {"bert.pooler.dense.weight": torch.eye(4), "classifier.weight": torch.randn(3, 4), "classifier.bias": torch.randn(3)}
    head = linear_head_from_state(state)
    x = torch.randn(2, 4)
    torch.testing.assert_close(head(x), x @ state["classifier.weight"].T + state["classifier.bias"])
    with pytest.raises(CheckpointError, match="no classifier weight"):
        linear_head_from_state({"w": torch.zeros(2, 2)}, name="expert.safetensors")


def test_hf_clip_text_encoder_uses_the_text_tower_and_projection() -> None:
    from transformers import CLIPConfig, CLIPModel

    from massmerge.heads.zoo import hf_clip_text_encoder

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()

    def tokenizer(texts: list[str], **_: object) -> dict[str, torch.Tensor]:
        ids = torch.ones(len(texts), 8, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, t in enumerate(texts):
            codes = [2 + ord(c) % 90 for c in t][:7] + [1]
            ids[row, : len(codes)] = torch.tensor(codes)
            mask[row, : len(codes)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    encode = hf_clip_text_encoder(model, tokenizer, batch_size=2)
    out = encode(["a cat", "a dog", "a bird"])
    tokens = tokenizer(["a cat", "a dog", "a bird"])
    with torch.no_grad():
        expected = model.text_projection(model.text_model(**tokens).pooler_output)
    assert out.shape == (3, 16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
