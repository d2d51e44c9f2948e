"""Model-family adapters: routing layer, token pooling, features and loading (design.md section 5).

Use :func:`adapter_for` on a built model (auto-detects the family and binds model-specific facts such as the
token layout) or :func:`get_adapter` by name; :func:`detect_family` reads a local checkpoint directory's config.
LoRA adapters are an *expert format*, not a family: see :mod:`massmerge.adapters.lora`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from massmerge.adapters.base import Adapter, BaseAdapter
from massmerge.adapters.clip import CLIPAdapter
from massmerge.adapters.families import FAMILIES, Family, family_row, generating_row, model_type_of
from massmerge.adapters.open_clip import OpenCLIPAdapter
from massmerge.adapters.seq2seq import Seq2SeqAdapter
from massmerge.adapters.text import TextEncoderAdapter
from massmerge.adapters.weights import (
    open_weights,
    read_json_config,
    refuse_remote_code,
)
from massmerge.errors import OptionError

ADAPTERS: dict[str, type[BaseAdapter]] = {
    CLIPAdapter.name: CLIPAdapter,
    OpenCLIPAdapter.name: OpenCLIPAdapter,
    TextEncoderAdapter.name: TextEncoderAdapter,
    Seq2SeqAdapter.name: Seq2SeqAdapter,
}

CLIP_TYPES = tuple(t for t, row in FAMILIES.items() if row.adapter == "clip")
TEXT_TYPES = tuple(t for t, row in FAMILIES.items() if row.adapter == "text")

__all__ = [
    "ADAPTERS",
    "FAMILIES",
    "Adapter",
    "BaseAdapter",
    "CLIPAdapter",
    "Family",
    "OpenCLIPAdapter",
    "Seq2SeqAdapter",
    "TextEncoderAdapter",
    "adapter_for",
    "detect_family",
    "family_of_model",
    "family_row",
    "get_adapter",
    "register_adapter",
]


def register_adapter(cls: type[BaseAdapter]) -> type[BaseAdapter]:
    """Add a family (usable as a class decorator); its ``name`` is the config/CLI value."""
    ADAPTERS[cls.name] = cls
    return cls


def get_adapter(name: str, **options: Any) -> BaseAdapter:
    """An adapter by family name (``clip``, ``open_clip``, ``text``) with options (routing_layer, pooling...)."""
    if name not in ADAPTERS:
        raise OptionError(f"family: unknown model family '{name}' (known: {', '.join(sorted(ADAPTERS))})")
    return ADAPTERS[name](**options)


def family_of_model(model: nn.Module) -> str:
    """The family of a built model: its HF ``model_type``'s row in the family table, or open_clip's layout."""
    model_type = model_type_of(model)
    if generating_row(model_type, [type(model).__name__]) is not None:
        return "seq2seq"
    if model_type is not None:
        return family_row(model_type, f"family: {type(model).__name__}").adapter
    visual = getattr(model, "visual", model)
    if hasattr(getattr(visual, "transformer", None), "resblocks"):
        return "open_clip"
    raise OptionError(f"family: cannot tell the model family of {type(model).__name__}; pass family=clip|open_clip|text|seq2seq")


def adapter_for(model: nn.Module, family: str | None = None, **options: Any) -> BaseAdapter:
    """The adapter for a built model, auto-detected unless ``family`` is given, bound to the model."""
    return get_adapter(family or family_of_model(model), **options).bind(model)


def detect_family(path: str | Path) -> str:
    """The family of a local checkpoint: HF ``config.json`` model_type, open_clip config, else the key layout."""
    path = Path(path)
    refuse_remote_code(path)
    config = path / "config.json" if path.is_dir() else None
    if config is not None and config.is_file():
        raw = read_json_config(config)
        model_type = raw.get("model_type") if isinstance(raw, dict) else None
        if isinstance(raw, dict) and generating_row(model_type, raw.get("architectures")) is not None:
            return "seq2seq"
        if model_type:
            return family_row(model_type, f"{config}: field 'model_type'").adapter
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        return "open_clip"
    if path.is_dir() and (path / "adapter_config.json").is_file():
        raise OptionError(f"{path}: is a LoRA adapter; give the base model's family (it is an expert format)")
    return _family_from_keys(path)


def _family_from_keys(path: Path) -> str:
    keys = list(open_weights(path))
    if any(".resblocks." in k and "c_fc" in k for k in keys):
        return "open_clip"
    if any("embeddings.class_embedding" in k for k in keys):
        return "clip"
    if any(".intermediate.dense." in k or "DenseReluDense" in k for k in keys):
        return "text"
    raise OptionError(f"{path}: cannot tell the model family from its keys; pass family=clip|open_clip|text")
