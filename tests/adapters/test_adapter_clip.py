"""HF CLIP adapter: loading real on-disk formats, routing-layer discovery, CLS selection by the real layout."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny_models import DEPTH, clip_config, low_rank_deltas, perturbed, save_clip_vision, save_prefixed

from massmerge.adapters import CLIPAdapter, adapter_for, detect_family, get_adapter
from massmerge.adapters.base import capture_input
from massmerge.mass.config import default_routing_block
from massmerge.errors import CheckpointError, OptionError


def test_default_routing_block_is_three_quarters_depth() -> None:
    assert default_routing_block(12) == 9
    assert default_routing_block(24) == 18
    assert default_routing_block(4) == 3
    assert default_routing_block(1) == 0


def test_routing_layer_discovery_and_override(tmp_path: Path) -> None:
    model, _ = save_clip_vision(tmp_path, depth=12)
    assert adapter_for(model).routing_layer(model).endswith("layers.9.mlp.fc1")
    assert CLIPAdapter(routing_layer=2).routing_layer(model).endswith("layers.2.mlp.fc1")
    name = CLIPAdapter().routing_layer(model).replace(".9.", ".5.")
    assert CLIPAdapter(routing_layer=name).routing_layer(model) == name
    with pytest.raises(OptionError, match="not an nn.Linear"):
        CLIPAdapter(routing_layer=name.rsplit(".", 1)[0]).routing_layer(model)
    with pytest.raises(OptionError, match="out of range"):
        CLIPAdapter(routing_layer=12).routing_layer(model)


def test_cls_token_is_taken_per_sample_not_the_first_sample(tmp_path: Path) -> None:
    """Batch size == sequence length (17), so taking activation[0] would have the right shape but wrong values."""
    model, _ = save_clip_vision(tmp_path)
    adapter = adapter_for(model)
    layer = adapter.routing_layer(model)
    images = torch.randn(17, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    activation = capture_input(model, layer, lambda: model(pixel_values=images))
    assert activation.shape[:2] == (17, 17)
    z = adapter.pool(activation, {"pixel_values": images})
    for i in (0, 5, 16):
        alone = capture_input(model, layer, lambda: model(pixel_values=images[i:i + 1]))
        torch.testing.assert_close(z[i], alone[0, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(z, activation[0], atol=1e-3)  # the batch-index bug gives something else


def test_load_model_and_expert_weights_in_transformers4_format(tmp_path: Path) -> None:
    """Experts saved as `vision_model.*` (transformers 4, the hub experts) align to the model's own keys."""
    model, base_dir = save_clip_vision(tmp_path)
    adapter = CLIPAdapter()
    loaded = adapter.load_model(str(base_dir))
    deltas = low_rank_deltas(loaded, seed=3)
    expert_dir = save_prefixed(perturbed(loaded, deltas), tmp_path / "expert", "vision_model.")
    (expert_dir / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    expert = adapter.load_weights(str(expert_dir), loaded)
    base = loaded.state_dict()
    assert set(expert) == set(base)
    for key in base:
        torch.testing.assert_close(expert[key] - base[key], deltas[key], atol=1e-6, rtol=1e-5)
    assert detect_family(expert_dir) == "clip"


def test_full_clip_model_merges_only_the_vision_tower(tmp_path: Path) -> None:
    from transformers import CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(clip_config()).eval()
    model.save_pretrained(str(tmp_path / "clip"))
    adapter = adapter_for(model)
    assert adapter.routing_layer(model) == f"vision_model.encoder.layers.{DEPTH - 1}.mlp.fc1"
    keys = adapter.encoder_keys(model)
    assert keys and all(k.startswith("vision_model.") for k in keys)
    images = torch.randn(2, 3, 32, 32)
    expected = model.visual_projection(model.vision_model(pixel_values=images).pooler_output)
    torch.testing.assert_close(adapter.features(model, {"pixel_values": images}), expected)
    # A CLIPVisionModel loaded from the full CLIP directory keeps the base's projection aside for features.
    vision_adapter = CLIPAdapter()
    vision = vision_adapter.load_model(str(tmp_path / "clip"))
    torch.testing.assert_close(vision_adapter.features(vision, images), expected, atol=1e-5, rtol=1e-5)


def test_expert_missing_a_key_names_it(tmp_path: Path) -> None:
    model, _ = save_clip_vision(tmp_path)
    state = model.state_dict()
    del state[next(k for k in state if k.endswith("post_layernorm.bias"))]
    bad = save_prefixed(state, tmp_path / "bad", "")
    with pytest.raises(CheckpointError, match="post_layernorm.bias"):
        CLIPAdapter().load_weights(str(bad), model)


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(CheckpointError, match="trust-pickle"):
        CLIPAdapter().load_model(str(folder))


def test_unknown_family_and_pooling_are_clear_errors() -> None:
    with pytest.raises(OptionError, match="unknown model family 'vit'"):
        get_adapter("vit")
    with pytest.raises(OptionError, match="pooling"):
        CLIPAdapter(pooling="max")


def test_clip_experts_through_mass_reproduce_each_expert(tmp_path: Path) -> None:
    """End to end on real formats: with rank_fraction 1, MASS's single-task pass is exactly the expert."""
    from massmerge.heads import ZeroShotHead
    from massmerge.mass import ExpertFactors, MASSModel, make_serve_settings
    from massmerge.task_vectors import task_vector

    _, base_dir = save_clip_vision(tmp_path)
    adapter = CLIPAdapter()
    model = adapter.load_model(str(base_dir))
    base = model.state_dict()
    expert_dirs = []
    for seed in (1, 2):
        folder = save_prefixed(perturbed(model, low_rank_deltas(model, seed=seed)), tmp_path / f"e{seed}", "vision_model.")
        expert_dirs.append(folder)
    tvs = (task_vector(base, adapter.load_weights(str(d), model)) for d in expert_dirs)
    factors = ExpertFactors.build(tvs, ["a", "b"], rank_fraction=1.0, eps=None)
    heads = [ZeroShotHead(torch.randn(3, HIDDEN_OUT)) for _ in range(2)]
    mass = MASSModel(model, factors, heads, make_serve_settings(routing_layers=(adapter.routing_layer(model),)),
                     pool=adapter.pool, features=adapter.features)
    images = torch.randn(4, 3, 32, 32)
    expert = copy.deepcopy(model)
    expert.load_state_dict(dict(adapter.load_weights(str(expert_dirs[1]), model)))
    with torch.no_grad():
        torch.testing.assert_close(mass.features_with((1,), images), adapter.features(expert, images), atol=1e-4, rtol=1e-4)
        out = mass({"pixel_values": images})
    assert out.selected.shape == (4, 2) and bool(out.selected.any(dim=1).all())


HIDDEN_OUT = 32  # a CLIPVisionModel without a projection outputs the pooled hidden state


# ----- the real hub layouts: openai bases (pickle only, or both formats) ------------------------------------------

def _image_features(clip: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = clip.get_image_features(pixel_values=images)
    return getattr(out, "pooler_output", out)  # transformers 5 may wrap it


def test_projection_comes_from_a_pickle_only_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """openai/clip-vit-base-patch32's layout: the features are the projected embedding, projection_dim wide."""
    from hub_model_fixtures import PROJECTION_DIM, VISION_WIDTH, write_openai_base

    monkeypatch.setenv("MASSMERGE_CONVERTED_DIR", str(tmp_path / "converted"))
    clip, base = write_openai_base(tmp_path / "openai")
    adapter = CLIPAdapter()
    model = adapter.load_model(str(base), trust_pickle=True)
    assert adapter.projection is not None and adapter.feature_dim(model) == PROJECTION_DIM != VISION_WIDTH
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(adapter.features(model, images), _image_features(clip, images), atol=1e-5, rtol=1e-5)


def test_pickle_only_base_refusal_names_the_file_and_the_option(tmp_path: Path) -> None:
    from hub_model_fixtures import write_openai_base

    _, base = write_openai_base(tmp_path / "openai")
    with pytest.raises(CheckpointError) as info:
        CLIPAdapter().load_model(str(base))
    message = str(info.value)
    assert message.startswith(str(base / "pytorch_model.bin")) and "\n" not in message
    assert "--trust-pickle" in message and "trust_pickle" in message


def test_both_formats_read_safetensors_and_never_open_the_bin(tmp_path: Path) -> None:
    """openai/clip-vit-large-patch14's layout, with the .bin replaced by junk bytes: nothing may open it."""
    from hub_model_fixtures import PROJECTION_DIM, write_openai_base

    from massmerge.heads.zoo import load_hf_clip_text

    clip, base = write_openai_base(tmp_path / "l14", safetensors=True)
    adapter = CLIPAdapter()
    model = adapter.load_model(str(base))  # not trusting pickle: the .bin is not needed
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(adapter.features(model, images), _image_features(clip, images), atol=1e-5, rtol=1e-5)
    encode, _ = load_hf_clip_text(str(base))
    assert encode(["a photo of a cat."]).shape == (1, PROJECTION_DIM)
