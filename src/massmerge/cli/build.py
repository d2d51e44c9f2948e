"""``massmerge build``: base + experts + heads -> a deployable MASS artifact directory.

Experts are streamed (one open at a time, one tensor read at a time) and reduced to their factors as they
arrive, so memory stays near base + factors whatever the number of experts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from massmerge.artifact import (
    artifact_bytes,
    float_dtype,
    parse_dtype,
    read_head_file,
    round_factors,
    save_artifact,
    storage_dtype,
)
from massmerge.cli import app
from massmerge.errors import OptionError
from massmerge.mass.budget import fit_to_size, metadata_bytes
from massmerge.mass.config import make_config
from massmerge.mass.experts import ExpertFactors
from massmerge.mass.model import MASSModel
from massmerge.mass.stream import build_factors
from massmerge.task_vectors import KeyFilter


def load_heads(paths: list[Path], task_names: list[str] | None, experts: list[Path]) -> tuple[list, list[str], list]:
    """Heads, task names (``--task-names``, else each file's ``task`` metadata, else the expert's name), classes."""
    if len(paths) != len(experts):
        raise OptionError(f"--heads: {len(paths)} heads files for {len(experts)} experts")
    if task_names is not None and len(task_names) != len(experts):
        raise OptionError(f"--task-names: {len(task_names)} names for {len(experts)} experts")
    heads, names, classes = [], [], []
    for index, path in enumerate(paths):
        head, task, class_names = read_head_file(path)
        heads.append(head)
        classes.append(class_names)
        names.append(task_names[index] if task_names else task or experts[index].stem)
    return heads, names, classes


def adapter_options(family: str, routing_layer: str | None, pooling: str | None,
                    feature_pooling: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if routing_layer is not None:
        options["routing_layer"] = int(routing_layer) if routing_layer.lstrip("-").isdigit() else routing_layer
    if pooling is not None:
        options["pooling"] = pooling
    if feature_pooling is not None:
        if family != "text":
            raise OptionError(f"--feature-pooling applies to text models, not family '{family}'")
        options["feature_pooling"] = feature_pooling
    return options


@app.command("build")
def build_cmd(
    base: Annotated[Path, typer.Option(help="base model: HF model directory (or hub id)")],
    experts: Annotated[list[Path], typer.Option(help="expert checkpoints (HF directories or .safetensors), >= 2")],
    heads: Annotated[list[Path], typer.Option(help="one heads .safetensors file per expert (see README)")],
    output: Annotated[Path, typer.Option(help="artifact directory to write (atomically)")],
    task_names: Annotated[list[str] | None, typer.Option(help="task names (default: heads metadata or expert)")] = None,
    family: Annotated[str | None, typer.Option(help="model family: text, clip, open_clip (auto-detected)")] = None,
    routing_layer: Annotated[str | None, typer.Option(help="routing nn.Linear name or block index")] = None,
    pooling: Annotated[str | None, typer.Option(help="routing pooling: cls or mean (family default)")] = None,
    feature_pooling: Annotated[str | None, typer.Option(help="text features: mean, cls or pooler")] = None,
    rank_fraction: Annotated[float | None, typer.Option(help="kept rank fraction (default 1/T)")] = None,
    eps: Annotated[float, typer.Option(help="de-redundancy cosine threshold")] = 0.3,
    no_deredundancy: Annotated[bool, typer.Option(help="merge every task in the first pass")] = False,
    alpha: Annotated[float, typer.Option(help="scale of the merged delta")] = 1.0,
    eta: Annotated[float, typer.Option(help="router probability threshold")] = 0.2,
    top_k: Annotated[int, typer.Option(help="at most K tasks per sample")] = 3,
    tau: Annotated[float, typer.Option(help="router softmax temperature")] = 1.0,
    mode: Annotated[str, typer.Option(help="routing mode: topk, top1 or batch")] = "topk",
    svd: Annotated[str, typer.Option(help="auto, exact or randomized")] = "auto",
    factor_dtype: Annotated[str, typer.Option(help="auto (float16 for 32-bit bases), float32, float16, bfloat16")] = "auto",
    max_size: Annotated[float | None, typer.Option(help="cut every task's rank by one fraction so the artifact is at "
                                                        "most this many times the base's size (default 2.1 where "
                                                        "reachable; 0: keep the design ranks)")] = None,
    include: Annotated[list[str] | None, typer.Option(help="only merge keys matching these globs")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="leave keys matching these globs at the base")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="allow .bin/.pt files (weights-only load)")] = False,
) -> None:
    """Build a MASS artifact: the base, each expert's factors, non-matrix deltas, heads and a manifest."""
    from massmerge.adapters import detect_family, get_adapter
    from massmerge.sources import resolve_source

    if len(experts) < 2:
        raise OptionError(f"--experts: MASS needs at least 2 experts, got {len(experts)}")
    head_modules, names, classes = load_heads(heads, task_names, experts)
    base_path = resolve_source(str(base))
    fam = family or detect_family(base_path)
    adapter = get_adapter(fam, **adapter_options(fam, routing_layer, pooling, feature_pooling))
    model = adapter.load_model(str(base_path), trust_pickle=trust_pickle)
    adapter.bind(model)
    config = make_config(routing_layer=adapter.routing_layer(model), rank_fraction=rank_fraction,
                         eps=None if no_deredundancy else eps, alpha=alpha, eta=eta, top_k=top_k, tau=tau,
                         mode=mode, svd=svd)
    state = model.state_dict()
    encoder = {key: state[key] for key in adapter.encoder_keys(model)}
    key_filter = KeyFilter.from_patterns(include, exclude)

    def open_expert(path: Path):
        return adapter.load_weights(str(path), model, trust_pickle=trust_pickle)

    factors = build_factors(encoder, experts, names, rank_fraction=config.rank_fraction, eps=config.eps,
                            svd=config.svd, open_expert=open_expert, key_filter=key_filter)
    store = storage_dtype(float_dtype(encoder)) if factor_dtype == "auto" else parse_dtype(factor_dtype)
    base_bytes = tensor_bytes(state.values())
    factors, scale = fit_size(factors, head_modules, base_bytes, store, max_size)
    factors = round_factors(factors, store)  # what is saved is exactly what a later load() serves
    mass = MASSModel(model, factors, head_modules, config, pool=adapter.pool, features=adapter.features)
    save_artifact(mass, output, adapter=adapter, tokenizer_dir=base_path if base_path.is_dir() else None,
                  factor_dtype=store, class_names=classes, rank_scale=scale)
    dropped = factors.dropped()
    budget = max_size or DEFAULT_MAX_SIZE
    ranks = "design ranks" if scale == 1.0 else f"ranks cut to {scale:.0%} to fit --max-size {budget}"
    typer.echo(f"wrote {output} ({len(names)} tasks: {', '.join(names)}; routing layer {config.routing_layer}; "
               f"factors {str(store).removeprefix('torch.')}, {ranks}; "
               f"{artifact_bytes(output) / base_bytes:.2f}x the base's tensors; "
               f"de-redundancy dropped tasks in {len(dropped)} matrices)")


DEFAULT_MAX_SIZE = 2.1  # issue 5's storage target: the artifact at most 2.1x the base


def fit_size(factors: ExpertFactors, heads: list, base_bytes: int, store: Any,
             max_size: float | None) -> tuple[ExpertFactors, float]:
    """Factors cut to ``--max-size`` (an explicit budget that cannot be met is an error; the default budget is
    best effort: a model too small for it keeps its design ranks, with a note) and the rank scale kept."""
    if max_size == 0:
        return factors, 1.0
    extra = metadata_bytes(factors) + tensor_bytes(p for h in heads for p in h.state_dict().values())
    try:
        fit = fit_to_size(factors, base_bytes=base_bytes, max_size=max_size or DEFAULT_MAX_SIZE, store=store,
                          extra_bytes=extra)
    except OptionError as exc:
        if max_size is not None:
            raise
        typer.echo(f"note: design ranks kept; {exc}".replace("; raise it or use --factor-dtype float16", ""),
                   err=True)
        return factors, 1.0
    return fit.factors, fit.rank_scale


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the tensors' elements (what safetensors stores, headers aside)."""
    return sum(t.numel() * t.element_size() for t in tensors)

