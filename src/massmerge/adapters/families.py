"""Families from a table: each supported HF ``model_type`` is one declared row, never a guess.

A row says which adapter serves it, where its transformer blocks are, which linear of a block is the routing
matrix by default, its norm kind (``layer``: ``nn.LayerNorm``, routed by a dedicated kernel; ``rms``: a scale-only
norm, ``weight * normalize(x)``, whose class gets the scale-norm kernel of :mod:`massmerge.mass.routed`), the
tensors it ties, the routing pooling and the HF Auto class that loads it. An unsupported ``model_type`` is one
line naming it and the supported ones. Adding a family (Llama, Qwen2, Mistral, GPT-2, T5 seq2seq) is a row plus
the kernels it needs.

The adapter options (what ``build`` takes for a family and an artifact's manifest records) are declared once in
:mod:`massmerge.adapter_options` (torch-free, for the command line) and re-exported here (:data:`ADAPTER_OPTIONS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from massmerge.adapter_options import (  # declared torch-free; re-exported beside the family table
    ADAPTER_OPTIONS,
    FEATURE_POOLINGS,
    AdapterOption,
    check_adapter_options,
    recorded_options,
)
from massmerge.errors import OptionError
from massmerge.mass.routed import register_scale_norm

NormKind = Literal["layer", "rms"]

# where the blocks and the routing matrix are: the HF text encoders (BERT-likes and T5 encoders) share one list
# of block names and of first-MLP names (the longest block list named so; a generic MLP rule after the names)
TEXT_BLOCKS = ("encoder.layer", "encoder.block", "transformer.layer", "encoder.layers", "layers")
TEXT_MLP = ("intermediate.dense", "ffn.lin1", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi", "mlp.fc1")
CLIP_BLOCKS = ("encoder.layers",)
CLIP_MLP = ("mlp.fc1",)
OPEN_CLIP_BLOCKS = ("transformer.resblocks",)
OPEN_CLIP_MLP = ("mlp.c_fc",)


@dataclass(frozen=True)
class Family:
    """One supported ``model_type``: everything MASS needs to know about it (module doc)."""

    model_type: str
    adapter: str  # the adapter that serves it: text, clip or open_clip
    blocks: tuple[str, ...]  # names of the nn.ModuleList of transformer blocks (suffixes)
    routing: tuple[str, ...]  # the routing matrix in a block: its first MLP linear, names in order of preference
    norm: NormKind = "layer"
    norm_class: str | None = None  # the scale-only norm's class (norm "rms")
    tied: tuple[str, ...] = ()  # tensors that are one tensor under several names (merged once)
    pooling: str = "content"  # the routing pooling by default (text: content when the special ids are known)
    auto_class: str = "AutoModel"  # the transformers class that loads the family's encoder


def _bert_like(model_type: str) -> Family:
    return Family(model_type, "text", TEXT_BLOCKS, TEXT_MLP)


def _t5(model_type: str, norm_class: str) -> Family:
    """A T5 encoder (as today; the seq2seq row comes with issue 29): scale-only norms, the embedding tied."""
    return Family(model_type, "text", TEXT_BLOCKS, TEXT_MLP, "rms", norm_class,
                  ("shared.weight", "encoder.embed_tokens.weight"), auto_class="T5EncoderModel")


#: Models that generate, keyed by the HF class named in a config's ``architectures`` (their ``model_type`` is
#: shared with an encoder-only row: a T5 checkpoint of ``T5ForConditionalGeneration`` is seq2seq, not text).
#: Routing is on the prompt in the encoder, at the official MASS layer (the input of block 10 of 12's attention
#: output ``o``, scaled to depth by the adapter); pooling a masked mean over the prompt's real tokens.
GENERATING: dict[str, Family] = {row.auto_class: row for row in (
    Family("t5", "seq2seq", ("encoder.block",), ("layer.0.SelfAttention.o",), "rms", "T5LayerNorm",
           ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"), pooling="mean",
           auto_class="T5ForConditionalGeneration"),
)}

FAMILIES: dict[str, Family] = {row.model_type: row for row in (
    _bert_like("bert"), _bert_like("roberta"), _bert_like("xlm-roberta"), _bert_like("camembert"),
    _bert_like("electra"), _bert_like("deberta"), _bert_like("deberta-v2"), _bert_like("mpnet"),
    _bert_like("albert"), _bert_like("distilbert"), _bert_like("modernbert"),
    _t5("t5", "T5LayerNorm"), _t5("mt5", "MT5LayerNorm"), _t5("umt5", "UMT5LayerNorm"),
    Family("clip", "clip", CLIP_BLOCKS, CLIP_MLP, pooling="cls", auto_class="CLIPVisionModel"),
    Family("clip_vision_model", "clip", CLIP_BLOCKS, CLIP_MLP, pooling="cls", auto_class="CLIPVisionModel"),
    Family("open_clip", "open_clip", OPEN_CLIP_BLOCKS, OPEN_CLIP_MLP, pooling="cls",
           auto_class="open_clip.create_model"),
)}

for _row in FAMILIES.values():
    if _row.norm == "rms" and _row.norm_class:
        register_scale_norm(_row.norm_class)


def family_row(model_type: str | None, where: str = "model") -> Family:
    """The row of ``model_type``; an unsupported one is one line naming it and the supported ones."""
    row = FAMILIES.get(model_type or "")
    if row is None:
        raise OptionError(f"{where}: model_type '{model_type}' is not a supported family (supported: "
                          f"{', '.join(sorted(FAMILIES))})")
    return row


def generating_row(model_type: str | None, architectures: Any) -> Family | None:
    """The generating row of a config (``model_type`` and its ``architectures`` list), or None: a T5 config whose
    architectures name ``T5ForConditionalGeneration`` is the seq2seq family rather than a text encoder."""
    for name in architectures if isinstance(architectures, list) else ():
        row = GENERATING.get(str(name))
        if row is not None and row.model_type == model_type:
            return row
    return None


def model_type_of(model: Any) -> str | None:
    """The HF ``config.model_type`` of a built model (None for a model without an HF config)."""
    return getattr(getattr(model, "config", None), "model_type", None)


__all__ = [
    "ADAPTER_OPTIONS",
    "FAMILIES",
    "FEATURE_POOLINGS",
    "GENERATING",
    "AdapterOption",
    "Family",
    "NormKind",
    "check_adapter_options",
    "family_row",
    "generating_row",
    "model_type_of",
    "recorded_options",
]
