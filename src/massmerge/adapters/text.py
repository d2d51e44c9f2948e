"""HF text encoders: encoder-only models (BERT, RoBERTa, DistilBERT, ELECTRA, DeBERTa, MPNet...) and T5 encoders.

Routing vector: text encoders have no token that summarizes the sequence before the last layer, so the router
pools each routing layer's input over the content tokens (neither padding nor special) when the tokenizer's
special ids are known, which the router ablation on the suite's validation splits chose (docs/SUITE.md: one-word
inputs are mostly [CLS] and [SEP] otherwise; ``tokens``, the RMS of each token's own residual, scored the same
within noise at 1.27x the serving cost); else the mean over the non-padding tokens (the paper's rule). Routing
matrix: the first MLP linear of block ``round(0.75 * depth)`` (``intermediate.dense`` in BERT-likes,
``ffn.lin1`` in DistilBERT, ``DenseReluDense.wi`` / ``wi_0`` (gated, Flan-T5) in T5); by default every linear
layer before it adds its evidence (:meth:`~massmerge.adapters.base.BaseAdapter.default_router`). Layout:
batch-first.

Features (``feature_pooling``): ``mean`` over the mask of the last hidden state (sentence-transformers style and
the default), ``cls`` (token 0) or ``pooler`` (BERT's tanh pooler, what ``*ForSequenceClassification`` heads read).
"""

from __future__ import annotations

from pathlib import Path
from pickle import UnpicklingError
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from torch import nn

from massmerge.adapters.base import BaseAdapter, Batch
from massmerge.adapters.families import FEATURE_POOLINGS, TEXT_BLOCKS, TEXT_MLP, family_row, model_type_of
from massmerge.adapters.weights import check_pickle_policy, refuse_remote_code
from massmerge.errors import MassMergeError, OptionError
from massmerge.mass.pooling import masked_mean
from massmerge.progress import quiet_third_party
from massmerge.sources import resolve_source

FeaturePooling = Literal["mean", "cls", "pooler"]
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
T5_TYPES = ("t5", "mt5", "umt5")


def text_inputs(batch: Batch, *, t5: bool = False) -> dict[str, torch.Tensor]:
    """The model kwargs of a tokenized batch (labels and other extras are dropped)."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    keys = TEXT_INPUTS[:2] if t5 else TEXT_INPUTS
    inputs = {k: batch[k] for k in keys if isinstance(batch.get(k), torch.Tensor)}
    if "input_ids" not in inputs:
        raise OptionError(f"batch: a text batch needs input_ids (and attention_mask); got {sorted(batch)}")
    return inputs


FALLBACK_MAX_LENGTH = 512  # tokens, for a model that records no positions (relative-position models)


def model_positions(model: nn.Module) -> int | None:
    """How many token positions the model has (None for relative-position models such as T5)."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def special_token_ids(directory: str | Path) -> list[int] | None:
    """The special token ids of the tokenizer in a model directory ([CLS], [SEP], padding...: what ``content``
    pooling leaves out), or None when the directory has no usable tokenizer."""
    try:
        from transformers import AutoTokenizer

        return sorted(set(AutoTokenizer.from_pretrained(str(directory)).all_special_ids))
    except (OSError, ValueError, TypeError):
        return None


def load_tokenizer(directory: str | Path) -> Any:
    """The tokenizer of a model directory (an artifact's ``model/``); none usable is one line naming it."""
    from transformers import AutoTokenizer

    try:
        with quiet_third_party():
            return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise MassMergeError(f"{directory}: no usable tokenizer in the artifact ({str(exc).splitlines()[0][:160]}); "
                             "build it from an HF directory that has tokenizer files") from None


def served_max_length(requested: int | None, recorded: int | None, positions: int | None, recorded_in: str
                      ) -> tuple[int, str | None]:
    """(tokens per input, a note or None): ``requested``, else ``recorded`` (what the experts were trained
    with), clipped to the model's positions; the note names where a clipped length came from."""
    length = requested or recorded or positions or FALLBACK_MAX_LENGTH
    if positions is not None and length > positions:
        source = f"--max-length {length}" if requested else f"{recorded_in}: field 'serve.max_length' ({length})"
        return positions, f"{source} is above the model's {positions} positions; using {positions}"
    return length, None


class TextEncoderAdapter(BaseAdapter):
    """Encoder-only HF text models and T5 encoders; mean pooling over the attention mask."""

    name = "text"
    block_suffixes = TEXT_BLOCKS
    block_exclude = ("decoder",)
    mlp_names = TEXT_MLP
    default_pooling = "content"  # chosen on validation (docs/SUITE.md); the paper's rule pools the mean
    paper_pooling = "mean"
    multi_layer_default = True

    def __init__(
        self, *, routing_layer: str | int | None = None, pooling=None, feature_pooling: FeaturePooling = "mean",  # noqa: ANN001
        special_ids: list[int] | tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(routing_layer=routing_layer, pooling=pooling, special_ids=special_ids)
        if pooling is None and special_ids is None:
            self.pooling = self.paper_pooling  # content and token pooling need the special ids
        if feature_pooling not in FEATURE_POOLINGS:
            raise OptionError(f"feature_pooling: unknown value '{feature_pooling}' (choose {', '.join(FEATURE_POOLINGS)})")
        self.feature_pooling: FeaturePooling = feature_pooling
        self.t5 = False

    def bind(self, model: nn.Module) -> TextEncoderAdapter:
        """The model's family row; T5 encoders take no ``token_type_ids``: remember whether this is one."""
        super().bind(model)
        self.t5 = model_type_of(model) in T5_TYPES
        return self

    def feature_dim(self, model: nn.Module) -> int | None:
        """The hidden size (mean, cls and pooler features all have it)."""
        config = getattr(model, "config", None)
        return getattr(config, "hidden_size", None) or getattr(config, "d_model", None)

    def features(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Sentence features ``[B, hidden]`` by ``feature_pooling``."""
        out = model(**text_inputs(batch, t5=self.t5))
        if self.feature_pooling == "pooler":
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                raise OptionError(f"feature_pooling: {type(model).__name__} has no pooler; use mean or cls")
            return pooled
        hidden = out.last_hidden_state
        if self.feature_pooling == "cls":
            return hidden[:, 0]
        mask = None if isinstance(batch, torch.Tensor) else batch.get("attention_mask")
        return masked_mean(hidden, mask)

    def load_model(self, source: str, *, revision: str | None = None, trust_pickle: bool = False) -> nn.Module:
        """``AutoModel`` (or ``T5EncoderModel`` for T5 configs) from a local directory or hub id."""
        import transformers

        path = resolve_source(source, revision)
        check_pickle_policy(path, trust_pickle=trust_pickle)
        refuse_remote_code(path)
        try:
            config = transformers.AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as exc:
            raise MassMergeError(f"{path}: cannot load a text encoder ({str(exc).strip().splitlines()[0][:200]})") from None
        row = family_row(config.model_type, f"{path}: config.json")
        if row.adapter != self.name:
            raise OptionError(f"{path}: model_type '{config.model_type}' is the {row.adapter} family, not {self.name}")
        try:
            # the row's class: T5's modeling code is imported only for T5 configs (it costs seconds at every load)
            model = getattr(transformers, row.auto_class).from_pretrained(str(path))
        except (OSError, ValueError, KeyError, RuntimeError, UnpicklingError, SafetensorError) as exc:
            raise MassMergeError(f"{path}: cannot load a text encoder ({str(exc).strip().splitlines()[0][:200]})") from None
        self.bind(model)
        return model.eval()
