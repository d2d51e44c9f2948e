"""Families from a table: every supported model_type is one declared row; an unsupported one is one line naming
it and the supported ones (a Llama checkpoint no longer loads silently as a text encoder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from massmerge.adapters import FAMILIES, detect_family, family_of_model, get_adapter
from massmerge.adapters.families import check_adapter_options, family_row
from massmerge.errors import OptionError
from massmerge.mass.routed import SCALE_NORMS

transformers = pytest.importorskip("transformers")


def test_every_row_names_an_adapter_blocks_a_routing_matrix_and_its_norm_kernel() -> None:
    from massmerge.adapters import ADAPTERS

    for model_type, row in FAMILIES.items():
        assert row.model_type == model_type and row.adapter in ADAPTERS and row.blocks and row.routing
        assert row.norm == "layer" or row.norm_class in SCALE_NORMS, model_type  # rms rows bring their kernel
    assert family_row("t5").norm_class == "T5LayerNorm" and family_row("bert").auto_class == "AutoModel"


def test_an_unsupported_model_type_is_one_line_naming_it_and_the_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match=r"model_type 'llama' is not a supported family \(supported: .*bert.*t5"):
        family_row("llama")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(OptionError) as caught:
        detect_family(tmp_path)
    assert "config.json: field 'model_type'" in str(caught.value) and "\n" not in str(caught.value)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2))
    with pytest.raises(OptionError, match="'llama' is not a supported family"):
        family_of_model(llama)


def test_built_models_find_their_row() -> None:
    from tiny_models import bert_config, clip_vision_config, t5_config

    assert family_of_model(transformers.BertModel(bert_config())) == "text"
    assert family_of_model(transformers.T5EncoderModel(t5_config())) == "text"
    assert family_of_model(transformers.CLIPVisionModel(clip_vision_config())) == "clip"
    adapter = get_adapter("text").bind(transformers.T5EncoderModel(t5_config()))
    assert adapter.block_suffixes == family_row("t5").blocks and adapter.t5


def test_adapter_options_are_checked_against_their_declaration() -> None:
    assert check_adapter_options("text", {"feature_pooling": "cls", "arch": None}) == {"feature_pooling": "cls"}
    with pytest.raises(OptionError, match="feature_pooling 'max' is not one of mean, cls, pooler"):
        check_adapter_options("text", {"feature_pooling": "max"})
    with pytest.raises(OptionError, match="option 'arch' is for the open_clip family, not text"):
        check_adapter_options("text", {"arch": "ViT-B-32"})
    with pytest.raises(OptionError, match="unknown adapter option 'depth'"):
        check_adapter_options("clip", {"depth": 3})


def test_a_bound_adapter_records_its_declared_options() -> None:
    from massmerge.adapters.families import recorded_options

    adapter = get_adapter("text", special_ids=(0, 2), feature_pooling="cls")
    assert recorded_options(adapter) == {"pooling": "content", "feature_pooling": "cls", "special_ids": [0, 2]}
    assert recorded_options(get_adapter("open_clip", arch="ViT-B-32")) == {"pooling": "cls", "arch": "ViT-B-32"}
