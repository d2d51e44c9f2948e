"""``massmerge build``: a base, experts and heads files in, a deployable MASS artifact directory out.

Everything a user can get wrong is checked before the first SVD: the output path, every heads file (finite
weights, one width, at least one class, a positive logit scale), the routing layer, and every expert (it opens,
and its keys and shapes match the base). Experts are then streamed (one open at a time, one tensor read at a
time) and reduced to their factors as they arrive (:func:`massmerge.mass.build.assemble`, the path
``evaluate`` and the suite score too), so memory stays near base + factors whatever the number of experts.
The artifact keeps the base's own sharding: a base that came sharded is written in shards of at most its largest
shard's size (:func:`massmerge.checkpoints.largest_shard_bytes`), one that came as one file as one file.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from massmerge.adapter_options import ADAPTER_OPTIONS
from massmerge.adapters import BaseAdapter, detect_family, get_adapter
from massmerge.adapters.text import model_positions, special_token_ids
from massmerge.artifact.manifest import factor_header_bytes
from massmerge.artifact.save import check_output_directory, write_artifact
from massmerge.artifact.size import artifact_bytes, base_file_bytes
from massmerge.checkpoints import largest_shard_bytes
from massmerge.device import describe as describe_device
from massmerge.errors import CheckpointError, OptionError
from massmerge.heads.files import HeadSet, head_width
from massmerge.mass.build import MASSParts, assemble, total_rank
from massmerge.mass.config import BuildSettings, ServeSettings, size_budget
from massmerge.mass.experts import ExpertFactors
from massmerge.mass.storage import to_storage
from massmerge.mass.stream import stream_task_vectors
from massmerge.sources import resolve_source
from massmerge.task_vectors import KeyFilter

Echo = Callable[..., None]  # echo(text, err=False): the summary line to stdout, notes (err=True) to stderr


def print_line(text: str, err: bool = False) -> None:
    """The default ``echo``: one line to stdout, or to stderr when ``err``."""
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def adapter_options(family: str, pooling: str | None, feature_pooling: str | None, special_ids: Any) -> dict[str, Any]:
    """The adapter options a build records (``--pooling``, ``--feature-pooling``, the text tokenizer's ids); a flag
    given for a family its declaration (:data:`~massmerge.adapter_options.ADAPTER_OPTIONS`) does not list is one
    line naming the flag."""
    options: dict[str, Any] = {}
    for name, value in (("pooling", pooling), ("feature_pooling", feature_pooling)):
        option = ADAPTER_OPTIONS[name]
        if value is not None and family not in option.families:
            raise OptionError(f"{option.flag} applies to {', '.join(option.families)} models, not family '{family}'")
        if value is not None:
            options[name] = value
    if family in ADAPTER_OPTIONS["special_ids"].families and special_ids is not None:
        options["special_ids"] = special_ids
    return options


def check_experts(adapter: BaseAdapter, model: nn.Module, experts: Sequence[Path], encoder: Mapping[str, torch.Tensor],
                  trust_pickle: bool) -> None:
    """Every expert opens and has the base's keys and shapes (headers only; no tensor is read)."""
    for path in experts:
        if not path.exists():
            raise OptionError(f"--experts: {path}: no such file or directory")
        checkpoint = adapter.load_weights(str(path), model, trust_pickle=trust_pickle)
        for key, value in encoder.items():
            shape = checkpoint.shape(key) if hasattr(checkpoint, "shape") else None
            if shape is not None and shape != tuple(value.shape):
                raise CheckpointError(f"{path}: key '{key}' has shape {list(shape)}, the base has {list(value.shape)}")


def summary(output: Path, names: Sequence[str], layer: str, store: torch.dtype, settings: BuildSettings, *,
            design_rank: int, stored: ExpertFactors, unreachable: bool) -> str:
    """The one line ``build`` ends with. Why so careful: it must never contradict itself (a rank "cut to
    100%", or a size above the budget it claims to fit), so the ranks are compared as stored and the size is
    measured on disk against the same base files the artifact holds."""
    size = artifact_bytes(output) / base_file_bytes(output)
    budget = size_budget(settings.max_size)
    named = f"--max-size {budget}" if settings.max_size is not None else f"the default {budget}x size budget"
    rule = "1/T" if settings.rank_fraction is None else f"--rank-fraction {settings.rank_fraction}"
    kept, full = total_rank(stored), design_rank
    if not budget:
        ranks = f"design ranks ({rule}), no size budget"
    elif kept < full:
        ranks = f"ranks cut to {math.floor(100 * kept / full)}% of the design ranks ({rule}) to fit {named}"
    elif unreachable:
        ranks = f"design ranks ({rule}) kept: {named} cannot hold one direction per task for this model"
    else:
        ranks = f"design ranks ({rule}) fit {named}"
    over = f", above {budget}x" if budget and size > budget and not unreachable else ""
    return (f"wrote {output}: {len(names)} tasks ({', '.join(names)}); routing layer {layer}; factors "
            f"{str(store).removeprefix('torch.')}, {ranks}; {size:.2f}x the base's files{over}; de-redundancy "
            f"left tasks out of the first pass in {len(stored.dropped())} matrices")



def family_adapter(base_path: Path, model: nn.Module, family: str, *, routing_layer: str | int | None,
                   pooling: str | None, feature_pooling: str | None, max_length: int | None
                   ) -> tuple[BaseAdapter, int | None]:
    """The bound adapter a build records, and the text length it serves with (the model's positions by default;
    a ``--max-length`` above them is an error)."""
    special, length = None, None
    if family == "text":
        special = special_token_ids(base_path)
        positions = model_positions(model)
        if max_length is not None and positions is not None and max_length > positions:
            raise OptionError(f"--max-length {max_length} is above the model's {positions} positions")
        length = max_length or positions
    options = adapter_options(family, pooling, feature_pooling, special)
    return get_adapter(family, routing_layer=routing_layer, **options).bind(model), length


def seq2seq_factors_of(adapter: BaseAdapter, model: nn.Module, base: str, experts: Sequence[Path],
                       task_names: Sequence[str], settings: BuildSettings, *, trust_pickle: bool = False,
                       key_filter: KeyFilter | None = None) -> ExpertFactors:
    """The factors of T5 experts: all full fine-tunes (streamed, one open at a time) or all PEFT LoRA adapters
    (exact factors, no dense delta), each checked against the base (config, target modules) before any SVD."""
    from massmerge.adapters.seq2seq import load_lora_seq2seq, lora_seq2seq_factors, seq2seq_factors

    lora = [(Path(resolve_source(str(p))) / "adapter_config.json").is_file() for p in experts]
    if any(lora) and not all(lora):
        raise OptionError("--experts: mix of LoRA adapters and full fine-tunes; give experts of one kind")
    state = model.state_dict()
    if all(lora):
        loaded = [load_lora_seq2seq(str(p), model, base=base, trust_pickle=trust_pickle) for p in experts]
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        return lora_seq2seq_factors(loaded, task_names, shapes, rank_fraction=settings.rank_fraction,
                                    eps=settings.eps)
    encoder = {key: state[key] for key in adapter.encoder_keys(model)}
    check_experts(adapter, model, experts, encoder, trust_pickle)
    stream = stream_task_vectors(encoder, experts, open_expert=lambda path: adapter.load_weights(
        str(path), model, trust_pickle=trust_pickle), key_filter=key_filter)
    return seq2seq_factors(stream, task_names, rank_fraction=settings.rank_fraction, eps=settings.eps)


def build_generating(base: Path, experts: Sequence[Path], task_names: Sequence[str] | None, output: Path,
                     settings: BuildSettings, *, routing_layer: str | int | None = None, pooling: str | None = None,
                     max_length: int | None = None, include: Sequence[str] | None = None,
                     exclude: Sequence[str] | None = None, trust_pickle: bool = False, dtype: str | None = None,
                     echo: Echo = print_line) -> Path:
    """``massmerge build`` of experts that generate (family seq2seq, T5): no heads; the artifact's output is
    ``generate``, its ``model/`` the base with its tokenizer and generation config."""
    from massmerge.adapters.seq2seq import base_config

    check_output_directory(output)
    names = list(task_names) if task_names else [Path(p).name for p in experts]
    if len(names) != len(experts):
        raise OptionError(f"--task-names: {len(names)} names for {len(experts)} experts")
    base_path = resolve_source(str(base))
    adapter = get_adapter("seq2seq", routing_layer=routing_layer, **({"pooling": pooling} if pooling else {}))
    model = adapter.load_model(str(base_path), trust_pickle=trust_pickle)
    adapter.bind(model)
    positions = getattr(model.config, "n_positions", None)
    factors = seq2seq_factors_of(adapter, model, str(base), experts, names, settings, trust_pickle=trust_pickle,
                                 key_filter=KeyFilter.from_patterns(include, exclude))
    layer = adapter.routing_layer_for(model, factors.matrices)
    parts = assemble(model, factors, names, [], build=settings, router=adapter.default_router(model, layer),
                     header_bytes=factor_header_bytes, max_length=max_length or positions, dtype=dtype)
    for note in (parts.expert_note, parts.note):
        if note:
            echo(f"note: {note}", err=True)
    write_parts(output, model, parts, adapter=adapter, hf_config=base_config(model),
                tokenizer_dir=base_path if base_path.is_dir() else None, output_kind="generate",
                base_shard_bytes=largest_shard_bytes(base_path))
    echo(summary(output, names, layer, parts.store, settings, design_rank=parts.design_rank,
                 stored=parts.factors, unreachable=parts.note is not None))
    return Path(output)


def build_artifact(base: Path, experts: Sequence[Path], heads: HeadSet, output: Path, settings: BuildSettings, *,
                   family: str | None = None, routing_layer: str | int | None = None, pooling: str | None = None,
                   feature_pooling: str | None = None, max_length: int | None = None,
                   include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                   trust_pickle: bool = False, device: torch.device | None = None, dtype: str | None = None,
                   echo: Echo = print_line) -> Path:
    """The whole build; every check comes before any SVD, which run on ``device`` (default: the CPU); ``dtype``
    is recorded as the artifact's serving precision. ``echo`` prints the notes (``err=True``) and the closing
    summary line."""
    check_output_directory(output)  # before hours of work, not after
    base_path = resolve_source(str(base))
    fam = family or detect_family(base_path)
    model = get_adapter(fam, routing_layer=routing_layer).load_model(str(base_path), trust_pickle=trust_pickle)
    adapter, length = family_adapter(base_path, model, fam, routing_layer=routing_layer, pooling=pooling,
                                     feature_pooling=feature_pooling, max_length=max_length)
    layer = adapter.routing_layer(model)
    state = model.state_dict()
    encoder = {key: state[key] for key in adapter.encoder_keys(model)}
    width = adapter.feature_dim(model)
    if width is not None and head_width(heads.heads[0]) != width:
        raise OptionError(f"--heads: the heads read {head_width(heads.heads[0])} features; the model's "
                          f"features are {width} wide")
    check_experts(adapter, model, experts, encoder, trust_pickle)

    def open_expert(path: Path) -> Mapping[str, torch.Tensor]:
        return adapter.load_weights(str(path), model, trust_pickle=trust_pickle)

    stream = stream_task_vectors(encoder, experts, open_expert=open_expert,
                                 key_filter=KeyFilter.from_patterns(include, exclude))
    echo(f"device: {describe_device(device or torch.device('cpu'))}", err=True)
    parts = assemble(model, stream, heads.names, heads.heads, build=settings, router=adapter.default_router(model),
                     header_bytes=factor_header_bytes, max_length=length, dtype=dtype, device=device)
    for note in (parts.expert_note, parts.note):
        if note:
            echo(f"note: {note}", err=True)
    write_parts(output, model, parts, adapter=adapter, tokenizer_dir=base_path if base_path.is_dir() else None,
                class_names=heads.class_names, base_shard_bytes=largest_shard_bytes(base_path))
    echo(summary(output, heads.names, layer, parts.store, settings, design_rank=parts.design_rank,
                 stored=parts.factors, unreachable=parts.note is not None))
    return Path(output)


def write_parts(output: Path, model: nn.Module, parts: MASSParts, *, serve: ServeSettings | None = None,
                consume: bool = True, **options: Any) -> Path:
    """Write assembled parts as an artifact (``serve``: other serve defaults than the parts'). With ``consume``
    the factors are converted to their storage dtype in place first (no second copy of them at write time), so
    ``parts`` no longer serves afterwards; without it they are converted one tensor at a time as they are
    written, and a model serving them is left as it was."""
    factors = to_storage(parts.factors, parts.store) if consume else parts.factors
    return write_artifact(output, base_model=model, factors=factors, heads=parts.heads, serve=serve or parts.serve,
                          build=parts.build, factor_dtype=parts.store, rank_scale=parts.rank_scale, **options)


__all__ = ["adapter_options", "build_artifact", "build_generating", "check_experts", "family_adapter",
           "seq2seq_factors_of", "summary", "write_parts"]
