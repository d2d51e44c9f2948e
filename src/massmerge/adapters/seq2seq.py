"""T5 / Flan-T5 experts that generate (``T5ForConditionalGeneration``): loading, checks and exact factors.

Why a family of its own: the text family loads an encoder only; a generating expert changes the decoder and the
LM head too, so every one of them is merged. What is a matrix here: each ``nn.Linear`` weight (attention
q/k/v/o, the MLP's wi/wi_0/wi_1/wo, an untied ``lm_head``) and the shared token embedding. T5's relative-attention
biases (``relative_attention_bias.weight``, ``[buckets, heads]``, a lookup table, not a map between spaces) and
its RMS norms are kept as non-matrix deltas, exactly as they are.

Tied weights: T5 always ties ``encoder.embed_tokens`` and ``decoder.embed_tokens`` to ``shared``, and ties the
LM head to it only when ``tie_word_embeddings`` is true (T5 v1.0; Flan-T5 sets it false). Each tied tensor is
merged once, under its first name (:func:`~massmerge.adapters.base.untied_keys`); an expert file that saves the
aliases too must hold the same values under them.

Experts: full fine-tunes (HF directories, sharded safetensors; FusionBench's ``tanganke/flan-t5-base_glue-*``
hold ``config.json`` and one float32 ``model.safetensors``) and PEFT LoRA adapters (``..._lora-16``: r 16 on
``q`` and ``v``, ``task_type`` ``SEQ_2_SEQ_LM``), whose ``scale B A`` becomes exact factors without a dense
matrix (:mod:`massmerge.adapters.lora`).

Routed generation (each prompt's task set through the encoder and every decode step) is
:meth:`massmerge.mass.model.MASSModel.generate`, through the engine's seam; this module gives the family's side
(loading, checks, factors, the official routing layer, the encoder's features for the first pass).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from massmerge.adapters.base import BaseAdapter, Batch, untied_keys
from massmerge.adapters.lora import (
    LoraExpert,
    load_lora_expert,
    lora_expert_factors,
    read_adapter_config,
)
from massmerge.adapters.weights import AlignedCheckpoint, open_weights, read_json_config, refuse_remote_code
from massmerge.errors import CheckpointError, OptionError
from massmerge.lowrank import LowRank, rank_for, rank_fraction_for, truncated_svd
from massmerge.mass.config import DEFAULT_EPS
from massmerge.mass.experts import ExpertFactors
from massmerge.mass.pooling import masked_mean
from massmerge.sources import parse_hub_id, resolve_source

SEQ2SEQ_TYPES = ("t5",)
#: config.json fields that fix the architecture: an expert must agree with the base on every one.
#: ``tie_word_embeddings`` is not among them: transformers 5 saves it as true for every T5 it builds, so an
#: expert saved there disagrees with Flan-T5's ``false`` about a tie the files decide (a saved lm_head is read).
ARCH_FIELDS = ("model_type", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers",
               "vocab_size", "feed_forward_proj", "relative_attention_num_buckets",
               "relative_attention_max_distance", "is_encoder_decoder")
LORA_TASK_TYPE = "SEQ_2_SEQ_LM"
#: The official MASS code routes at the input of ``encoder.block.10.layer.0.SelfAttention.o`` (Flan-T5-base,
#: 12 blocks); deeper or shallower encoders take the same relative depth.
OFFICIAL_ROUTING_BLOCK = (10, 12)
OFFICIAL_ROUTING_MODULE = "layer.0.SelfAttention.o"
_NON_MATRIX = re.compile(r"(^|\.)relative_attention_bias\.weight$")
#: T5 reads its token embedding through these names too; transformers 5 may build them as separate tensors,
#: so the tie is declared here by name rather than found by identity.
EMBED_ALIASES = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}


def is_factored(key: str, tensor: torch.Tensor) -> bool:
    """Whether ``key`` is merged as a matrix (low-rank factors): 2-D floating weights but the relative-attention
    bias tables."""
    return tensor.ndim == 2 and tensor.is_floating_point() and not _NON_MATRIX.search(key)


class Seq2SeqAdapter(BaseAdapter):
    """Flan-T5 / T5 ``T5ForConditionalGeneration``: blocks are the encoder's, routing is on the prompt."""

    name: ClassVar[str] = "seq2seq"
    block_suffixes: ClassVar[tuple[str, ...]] = ("encoder.block",)
    block_exclude: ClassVar[tuple[str, ...]] = ("decoder",)
    mlp_names: ClassVar[tuple[str, ...]] = ("layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wi_0")
    default_pooling = "mean"  # a masked mean over the prompt's real tokens
    paper_pooling = "mean"

    def routing_layer(self, model: nn.Module) -> str:
        """The official layer's input (``encoder.block.10.layer.0.SelfAttention.o`` on 12 blocks), unless
        overridden by name or block index (an index picks that block's first MLP matrix, as elsewhere)."""
        if self.routing_override is not None:
            return super().routing_layer(model)
        _, blocks = self.blocks(model)
        block, of = OFFICIAL_ROUTING_BLOCK
        index = min(len(blocks) - 1, round(block * len(blocks) / of))
        return f"encoder.block.{index}.{OFFICIAL_ROUTING_MODULE}"

    def bind(self, model: nn.Module) -> Seq2SeqAdapter:
        """Also re-tie T5's embedding aliases to ``shared`` (:func:`retie_embeddings`)."""
        super().bind(model)
        retie_embeddings(model)
        return self

    def routing_layer_for(self, model: nn.Module, factored: Iterable[str]) -> str:
        """The routing layer among the factored keys: the official one when its experts change it; else (LoRA
        experts on ``q`` and ``v`` only, as FusionBench's ``_lora-16``) the first factored linear of the same
        block, in forward order (``layer.0.SelfAttention.q``: the block's normed input)."""
        layer = self.routing_layer(model)
        keys = set(factored)
        if f"{layer}.weight" in keys or self.routing_override is not None:
            return layer
        block = layer.rsplit(".layer.", 1)[0]
        for name, module in dict(model.named_modules())[block].named_modules():
            if isinstance(module, nn.Linear) and f"{block}.{name}.weight" in keys:
                return f"{block}.{name}"
        raise OptionError(f"routing_layer: no linear of '{block}' has task factors; pass routing_layer=<name>")

    def encoder_keys(self, model: nn.Module) -> list[str]:
        """Every merged key (encoder, decoder, an untied LM head), each tied tensor once (``shared.weight``)."""
        return merged_keys(model)

    def load_model(self, source: str, *, revision: str | None = None, trust_pickle: bool = False) -> nn.Module:
        """The base ``T5ForConditionalGeneration`` from an HF directory or hub id (safetensors, no custom code)."""
        return load_seq2seq_model(source, revision=revision, trust_pickle=trust_pickle)

    def load_weights(self, source: str, model: nn.Module, *, revision: str | None = None,
                     trust_pickle: bool = False) -> AlignedCheckpoint:
        """A full fine-tune viewed under the model's merged keys, its config and tied copies checked."""
        return load_full_expert(source, model, revision=revision, trust_pickle=trust_pickle)

    def features(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The prompt's features: the encoder alone, its output averaged over the real tokens. MASS's first pass
        runs this (the routing layer is in the encoder, so the decoder is never reached); generation itself is
        ``MASSModel.generate``."""
        return encoder_features(model, batch)

    def feature_dim(self, model: nn.Module) -> int | None:
        """T5's ``d_model`` (the encoder output's width)."""
        return int(model.config.d_model)


def retie_embeddings(model: nn.Module) -> None:
    """Make ``encoder.embed_tokens`` and ``decoder.embed_tokens`` the one ``shared`` parameter again where they
    hold its values: loading tensors with ``assign=True`` (an artifact's base) gives each name its own tensor,
    and the routed engine merges the embedding once, under ``shared.weight``; an untied alias would keep the
    base's embedding under every task set."""
    shared = getattr(model, "shared", None)
    for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
        embed = getattr(stack, "embed_tokens", None)
        if shared is None or embed is None or embed.weight is shared.weight:
            continue
        if embed.weight.shape == shared.weight.shape and torch.equal(embed.weight, shared.weight):
            embed.weight = shared.weight


def encoder_features(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The encoder's last hidden states [B, L, d] averaged over the prompt's real tokens -> [B, d]."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise OptionError("family seq2seq: a batch is a dict with input_ids (and attention_mask)")
    mask = batch.get("attention_mask")
    hidden = model.encoder(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
    return masked_mean(hidden, mask)


# ----- loading and checks -----------------------------------------------------------------------------------

def model_config(path: Path) -> dict[str, Any]:
    """``config.json`` of an HF directory, checked to be a seq2seq model type this family serves."""
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json (a T5ForConditionalGeneration directory needs one)")
    config = read_json_config(file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    model_type = config.get("model_type")
    if model_type not in SEQ2SEQ_TYPES:
        raise CheckpointError(f"{file}: field 'model_type' is '{model_type}'; family seq2seq serves "
                              f"{', '.join(SEQ2SEQ_TYPES)}")
    return config


def arch_value(config: Mapping[str, Any], field: str) -> Any:
    """A config field with transformers' T5 defaults filled in (``num_decoder_layers`` = ``num_layers``, ties on,
    feed-forward ``relu``), so an expert that spells a default out agrees with a base that leaves it out."""
    defaults = {"num_decoder_layers": config.get("num_layers"), "feed_forward_proj": "relu", "is_encoder_decoder": True, "relative_attention_max_distance": 128}
    value = config.get(field)
    return defaults.get(field) if value is None else value


def check_same_architecture(base: Mapping[str, Any], expert: Mapping[str, Any], *, name: str) -> None:
    """One line naming the first architecture field where the expert's config differs from the base's."""
    for field in ARCH_FIELDS:
        ours, theirs = arch_value(base, field), arch_value(expert, field)
        if ours != theirs:
            raise CheckpointError(f"{name}/config.json: field '{field}' is {theirs!r}, the base has {ours!r}")


def load_seq2seq_model(source: str, *, revision: str | None = None, trust_pickle: bool = False) -> nn.Module:
    """Build ``T5ForConditionalGeneration`` with the base weights (eval mode)."""
    from transformers import T5ForConditionalGeneration

    path = resolve_source(source, revision)
    refuse_remote_code(path)
    config = model_config(path)
    open_weights(path, trust_pickle=trust_pickle)  # the pickle policy, before transformers reads anything
    try:
        model = T5ForConditionalGeneration.from_pretrained(path, use_safetensors=None if trust_pickle else True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load T5ForConditionalGeneration ({str(exc).splitlines()[0]})") from None
    _check_tied_copies(model.state_dict(), tied_aliases(model), name=str(path))
    model.source_config = config  # what experts are checked against (see base_config)
    return model.eval()


def base_config(model: nn.Module) -> dict[str, Any]:
    """The base's config.json as saved (what experts are checked against): transformers 5 rewrites some
    fields when it builds T5's config (``tie_word_embeddings`` always true), so the built config would not do."""
    saved = getattr(model, "source_config", None)
    return dict(saved) if isinstance(saved, dict) else model.config.to_dict()


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Every state-dict name of a tied tensor that is not its first name -> the first name: T5's embedding
    aliases by name, and any other tensor shared by identity (the LM head when ``tie_word_embeddings``)."""
    state = model.state_dict(keep_vars=True)
    aliases = {alias: first for alias, first in EMBED_ALIASES.items() if alias in state and first in state}
    first: dict[int, str] = {}
    for key, value in state.items():
        if id(value) in first and key not in aliases:
            aliases[key] = first[id(value)]
        else:
            first.setdefault(id(value), key)
    return aliases


def merged_keys(model: nn.Module) -> list[str]:
    """The state-dict keys that are merged: every tensor once, under its first name."""
    aliases = tied_aliases(model)
    return [k for k in untied_keys(model) if k not in aliases]


def load_full_expert(source: str, model: nn.Module, *, revision: str | None = None,
                     trust_pickle: bool = False) -> AlignedCheckpoint:
    """A full fine-tune (HF directory, sharded or not) under ``model``'s merged keys.

    Refused in one line: a config that differs from the base's architecture, a key the base lacks or misses,
    and a tied alias (``encoder.embed_tokens.weight``...) saved with values other than the tensor it is tied to.
    """
    path = resolve_source(source, revision)
    refuse_remote_code(path)
    if path.is_dir():
        check_same_architecture(base_config(model), model_config(path), name=str(path))
    weights = open_weights(path, trust_pickle=trust_pickle)
    keys = merged_keys(model)
    aligned = AlignedCheckpoint(weights, keys, name=str(path))
    _check_tied_copies(weights, tied_aliases(model), name=str(path))
    return aligned


def _check_tied_copies(weights: Mapping[str, torch.Tensor], aliases: Mapping[str, str], *, name: str) -> None:
    for alias, first in aliases.items():
        if alias in weights and first in weights and not torch.equal(weights[alias], weights[first]):
            raise CheckpointError(f"{name}: '{alias}' is tied to '{first}' in this architecture but the file holds "
                                  "different values under the two names")


# ----- LoRA experts -----------------------------------------------------------------------------------------

def base_names(base: str, model: nn.Module) -> set[str]:
    """Names the base model is known by: the spec, its hub repo id, and the config's ``_name_or_path``."""
    names = {base.rstrip("/")}
    parsed = parse_hub_id(base)
    if parsed:
        names.add(parsed[0])
    recorded = getattr(model.config, "_name_or_path", None) or getattr(model.config, "name_or_path", None)
    if recorded:
        names.add(str(recorded).rstrip("/"))
    return names


def check_lora_config(config: Mapping[str, Any], model: nn.Module, *, base: str, name: str) -> None:
    """The adapter is for this base and these modules: task type, base model, target modules, no extra heads."""
    task_type = config.get("task_type")
    if task_type not in (None, LORA_TASK_TYPE):
        raise CheckpointError(f"{name}/adapter_config.json: field 'task_type' is '{task_type}', "
                              f"a seq2seq expert needs '{LORA_TASK_TYPE}'")
    recorded = config.get("base_model_name_or_path")
    known = base_names(base, model)
    if recorded and recorded.rstrip("/") not in known and Path(recorded).name not in {Path(n).name for n in known}:
        raise CheckpointError(f"{name}/adapter_config.json: field 'base_model_name_or_path' is '{recorded}', "
                              f"the base is '{base}'")
    if config.get("modules_to_save"):
        raise CheckpointError(f"{name}/adapter_config.json: field 'modules_to_save' trains whole modules; "
                              "seq2seq LoRA experts must adapt low-rank only")
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Embedding)]
    for target in _targets(config.get("target_modules"), name):
        if not any(_target_matches(target, n) for n in linear):
            raise CheckpointError(f"{name}/adapter_config.json: target module '{target}' matches no layer of the "
                                  f"base ({type(model).__name__})")


def _targets(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise CheckpointError(f"{name}/adapter_config.json: field 'target_modules' must be a name, a list of names "
                          "or a regex")


def _target_matches(target: str, module: str) -> bool:
    """PEFT's rule: a listed name matches a module whose name ends with it; a string is also a full regex."""
    return module == target or module.endswith("." + target) or re.fullmatch(target, module) is not None


def load_lora_seq2seq(source: str, model: nn.Module, *, base: str, revision: str | None = None,
                      trust_pickle: bool = False) -> LoraExpert:
    """A PEFT LoRA adapter of ``model`` (hub id or directory), checked against the base before its weights."""
    path = resolve_source(source, revision)
    check_lora_config(read_adapter_config(path), model, base=base, name=str(path))
    keys = set(merged_keys(model))
    state = {k: v for k, v in model.state_dict().items() if k in keys}
    return load_lora_expert(path, list(state), state, trust_pickle=trust_pickle)


# ----- factors ----------------------------------------------------------------------------------------------

def full_expert_factors(task_vector: Mapping[str, torch.Tensor], *, rank_fraction: float,
                        dtype: torch.dtype = torch.float32) -> tuple[dict[str, LowRank], dict[str, torch.Tensor]]:
    """(matrix factors, non-matrix deltas) of one dense task vector: rank ``rank_for(shape, fraction)`` SVD of
    every factored key, the relative-attention biases and norms kept whole."""
    matrices: dict[str, LowRank] = {}
    others: dict[str, torch.Tensor] = {}
    for key in task_vector:
        delta = task_vector[key]
        if not delta.is_floating_point():
            continue
        if is_factored(key, delta):
            matrices[key] = truncated_svd(delta.to(dtype), rank_for(tuple(delta.shape), rank_fraction))
        else:
            others[key] = delta.to(dtype)
    return matrices, others


def seq2seq_factors(task_vectors: Iterable[Mapping[str, torch.Tensor]], task_names: Sequence[str], *,
                    rank_fraction: float | None = None, eps: float | None = DEFAULT_EPS) -> ExpertFactors:
    """An :class:`~massmerge.mass.experts.ExpertFactors` of full fine-tunes (one task vector at a time)."""
    fraction = rank_fraction_for(len(task_names), rank_fraction)
    factors = ExpertFactors(task_names=list(task_names), rank_fraction=fraction)
    for vector in task_vectors:
        factors.add_task_factors(*full_expert_factors(vector, rank_fraction=fraction))
    _check_count(factors, task_names)
    factors.apply_deredundancy(eps)
    return factors


def lora_seq2seq_factors(experts: Sequence[LoraExpert], task_names: Sequence[str],
                         shapes: Mapping[str, tuple[int, ...]], *, rank_fraction: float | None = None,
                         eps: float | None = DEFAULT_EPS) -> ExpertFactors:
    """An :class:`~massmerge.mass.experts.ExpertFactors` of LoRA experts, exact (QR + an r x r SVD), no dense
    delta; a relative-attention bias an adapter trains stays a non-matrix delta."""
    if len(experts) != len(task_names):
        raise OptionError(f"tasks: {len(task_names)} names for {len(experts)} LoRA experts")
    fraction = rank_fraction_for(len(experts), rank_fraction)
    factors = ExpertFactors(task_names=list(task_names), rank_fraction=fraction)
    for matrices, others in lora_expert_factors(experts, shapes, rank_fraction=fraction):
        for key in [k for k in matrices if _NON_MATRIX.search(k)]:
            factor = matrices.pop(key)
            others[key] = factor.U @ torch.diag(factor.s) @ factor.V.T
        factors.add_task_factors(matrices, others)
    _check_count(factors, task_names)
    factors.apply_deredundancy(eps)
    return factors


def _check_count(factors: ExpertFactors, task_names: Sequence[str]) -> None:
    if factors.num_tasks != len(task_names):
        raise OptionError(f"tasks: {len(task_names)} names for {factors.num_tasks} experts")


__all__ = [
    "ARCH_FIELDS",
    "EMBED_ALIASES",
    "LORA_TASK_TYPE",
    "OFFICIAL_ROUTING_BLOCK",
    "SEQ2SEQ_TYPES",
    "Seq2SeqAdapter",
    "check_lora_config",
    "check_same_architecture",
    "encoder_features",
    "full_expert_factors",
    "is_factored",
    "load_full_expert",
    "load_lora_seq2seq",
    "load_seq2seq_model",
    "lora_seq2seq_factors",
    "merged_keys",
    "model_config",
    "seq2seq_factors",
    "tied_aliases",
]
