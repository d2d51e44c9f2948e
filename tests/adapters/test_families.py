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


def test_the_manifest_and_build_flags_are_made_from_the_declaration() -> None:
    """One declaration: the manifest's AdapterOptions has exactly the declared options (a closed set, each value
    checked as declared), ``build``'s flags take their metavars and help from it, and a flag given for a family
    the declaration does not list is one line naming the flag."""
    from pydantic import ValidationError

    from massmerge.adapter_options import ADAPTER_OPTIONS
    from massmerge.artifact.build import adapter_options
    from massmerge.artifact.manifest import AdapterOptions

    assert list(AdapterOptions.model_fields) == list(ADAPTER_OPTIONS)
    assert AdapterOptions(special_ids=[0, 2], pooling="mean").model_dump(exclude_none=True) == {
        "pooling": "mean", "special_ids": [0, 2]}
    for bad in ({"evil": 1}, {"pooling": "max"}, {"feature_pooling": "evil"}, {"special_ids": [-1]}, {"arch": 3}):
        with pytest.raises(ValidationError):
            AdapterOptions(**bad)
    assert adapter_options("text", "mean", "cls", [0, 2]) == {"pooling": "mean", "feature_pooling": "cls",
                                                              "special_ids": [0, 2]}
    assert adapter_options("clip", None, None, [0]) == {}
    with pytest.raises(OptionError, match="^--feature-pooling applies to text models, not family 'clip'$"):
        adapter_options("clip", None, "cls", None)

    import typer

    from massmerge.cli import app

    build = typer.main.get_command(app).commands["build"]
    flags = {p.opts[0]: p for p in build.params if p.param_type_name == "option"}
    for name in ("pooling", "feature_pooling"):
        option = ADAPTER_OPTIONS[name]
        assert flags[option.flag].metavar == "|".join(option.choices or ()), name
        assert option.help in (flags[option.flag].help or ""), name
