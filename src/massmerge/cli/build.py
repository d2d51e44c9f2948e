"""``massmerge build``: base + experts + heads -> a deployable MASS artifact directory.

Everything a user can get wrong is checked before the first SVD: every option, the routing layer, every heads
file (finite weights, one width, at least one class, a positive logit scale) and every expert (it opens, and
its keys and shapes match the base). Experts are then streamed (one open at a time, one tensor read at a time)
and reduced to their factors as they arrive, so memory stays near base + factors whatever the number of experts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from massmerge.cli import command
from massmerge.cli.options import (
    DEREDUNDANCY_HELP,
    EPS_HELP,
    MAX_SIZE_HELP,
    RANK_FRACTION_HELP,
    TRUST_PICKLE_HELP,
    check_positive,
)
from massmerge.errors import OptionError
from massmerge.mass.config import DEFAULT_EPS, DEFAULT_MAX_SIZE, POOLINGS, check_pooling


def load_heads(paths: list[Path], task_names: list[str] | None, experts: list[Path]) -> tuple[list, list[str], list]:
    """Heads, task names (``--task-names``, else each file's ``task`` metadata, else the expert's name), classes."""
    from massmerge.artifact import check_task_names, read_head_file

    if len(paths) != len(experts):
        raise OptionError(f"--heads: {len(paths)} heads files for {len(experts)} experts")
    if task_names is not None and len(task_names) != len(experts):
        raise OptionError(f"--task-names: {len(task_names)} names for {len(experts)} experts")
    heads, names, classes = [], [], []
    for index, path in enumerate(paths):
        head, task, class_names = read_head_file(path)
        if heads and head_width(head) != head_width(heads[0]):
            raise OptionError(f"{path}: 'weight' is {head_width(head)} wide, but {paths[0]} is "
                              f"{head_width(heads[0])} wide (every head reads the same features)")
        heads.append(head)
        classes.append(class_names)
        names.append(task_names[index] if task_names else task or experts[index].stem)
    check_task_names(names, "--task-names" if task_names else "task names (the heads files' 'task' metadata, "
                     "else the experts' file names; set them with --task-names)")
    return heads, names, classes


def head_width(head: Any) -> int:
    """The feature width a head reads (its weight is [classes, width])."""
    return int(head.weight.shape[1])


def adapter_options(family: str, pooling: str | None, feature_pooling: str | None, special_ids: Any) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if pooling is not None:
        options["pooling"] = pooling
    if feature_pooling is not None:
        if family != "text":
            raise OptionError(f"--feature-pooling applies to text models, not family '{family}'")
        options["feature_pooling"] = feature_pooling
    if family == "text" and special_ids is not None:
        options["special_ids"] = special_ids
    return options


def routing_option(routing_layer: str | None) -> str | int | None:
    """``--routing-layer``: a module name or a block index."""
    if routing_layer is None:
        return None
    return int(routing_layer) if routing_layer.lstrip("-").isdigit() else routing_layer


def check_experts(adapter: Any, model: Any, experts: list[Path], encoder: dict, trust_pickle: bool) -> None:
    """Every expert opens and has the base's keys and shapes (headers only; no tensor is read)."""
    from massmerge.errors import CheckpointError

    for path in experts:
        if not path.exists():
            raise OptionError(f"--experts: {path}: no such file or directory")
        checkpoint = adapter.load_weights(str(path), model, trust_pickle=trust_pickle)
        for key, value in encoder.items():
            shape = checkpoint.shape(key) if hasattr(checkpoint, "shape") else None
            if shape is not None and shape != tuple(value.shape):
                raise CheckpointError(f"{path}: key '{key}' has shape {list(shape)}, the base has {list(value.shape)}")


def text_facts(base_path: Path, model: Any, max_length: int | None) -> tuple[list[int] | None, int | None]:
    """(special token ids, max length) of a text base: the ids from its tokenizer (for ``content`` pooling),
    the length checked against the model's positions (default: the positions)."""
    from massmerge.cli.predict import model_positions

    special = None
    try:
        from transformers import AutoTokenizer

        special = sorted(set(AutoTokenizer.from_pretrained(str(base_path)).all_special_ids))
    except (OSError, ValueError, TypeError):
        special = None
    positions = model_positions(model)
    if max_length is not None and positions is not None and max_length > positions:
        raise OptionError(f"--max-length {max_length} is above the model's {positions} positions")
    return special, max_length or positions


@command("build")
def build_cmd(
    base: Annotated[Path, typer.Option(metavar="PATH", help="base model: HF model directory (or hub id)")],
    experts: Annotated[list[Path], typer.Option(metavar="PATH...", help="expert checkpoints (HF directories or "
                                                                         ".safetensors), at least 2")],
    heads: Annotated[list[Path], typer.Option(metavar="PATH...", help="one heads .safetensors file per expert "
                                                                       "(see README)")],
    output: Annotated[Path, typer.Option(metavar="PATH", help="artifact directory to write (atomically)")],
    task_names: Annotated[list[str] | None, typer.Option(metavar="NAME...", help="task names [default: heads "
                                                                                   "metadata, else the expert's]")] = None,
    family: Annotated[str | None, typer.Option(metavar="NAME", help="model family: text, clip, open_clip "
                                                                    "[default: detected]")] = None,
    routing_layer: Annotated[str | None, typer.Option(metavar="NAME|INT", help="default routing nn.Linear (name or "
                                                                               "block index) [default: block "
                                                                               "round(0.75 depth)'s first MLP "
                                                                               "matrix]")] = None,
    pooling: Annotated[str | None, typer.Option(metavar="|".join(POOLINGS), help="default routing pooling "
                                                                                         "[default: the family's]")] = None,
    feature_pooling: Annotated[str | None, typer.Option(metavar="mean|cls|pooler", help="text features the experts "
                                                                                        "were trained with "
                                                                                        "[default: the text "
                                                                                        "family's]")] = None,
    max_length: Annotated[int | None, typer.Option(metavar="INT", help="text: tokens per input the experts were "
                                                                       "trained with [default: the model's "
                                                                       "positions]")] = None,
    rank_fraction: Annotated[float | None, typer.Option(metavar="FLOAT", help=RANK_FRACTION_HELP)] = None,
    eps: Annotated[float, typer.Option(metavar="FLOAT", help=EPS_HELP)] = DEFAULT_EPS,
    deredundancy: Annotated[bool, typer.Option("--deredundancy/--no-deredundancy", help=DEREDUNDANCY_HELP)] = True,
    svd: Annotated[str, typer.Option(metavar="auto|exact|randomized", help="truncated SVD method")] = "auto",
    factor_dtype: Annotated[str, typer.Option(metavar="DTYPE", help="auto (float16 for 32-bit bases), float32, "
                                                                    "float16, bfloat16")] = "auto",
    max_size: Annotated[float | None, typer.Option(metavar="FLOAT", help=MAX_SIZE_HELP)] = None,
    include: Annotated[list[str] | None, typer.Option(metavar="GLOB...", help="only merge keys matching these globs")] = None,
    exclude: Annotated[list[str] | None, typer.Option(metavar="GLOB...", help="leave keys matching these globs at "
                                                                              "the base")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help=TRUST_PICKLE_HELP)] = False,
) -> None:
    """Build a MASS artifact: the base, each expert's factors, non-matrix deltas, heads and a manifest."""
    from massmerge.mass.config import make_build_settings
    from massmerge.memory import tune_allocator_for_streaming

    tune_allocator_for_streaming()  # flat peak memory while experts stream through (massmerge/memory.py)

    if len(experts) < 2:
        raise OptionError(f"--experts: MASS needs at least 2 experts, got {len(experts)}")
    check_positive("--max-length", max_length)
    settings = make_build_settings(rank_fraction=rank_fraction, eps=eps if deredundancy else None, svd=svd,
                                   factor_dtype=factor_dtype, max_size=max_size)
    check_pooling(pooling)
    head_modules, names, classes = load_heads(heads, task_names, experts)
    build_artifact(base, experts, head_modules, names, classes, output, settings, family=family,
                   routing_layer=routing_layer, pooling=pooling, feature_pooling=feature_pooling,
                   max_length=max_length, include=include, exclude=exclude, trust_pickle=trust_pickle)


def build_artifact(base: Path, experts: list[Path], head_modules: list, names: list[str], classes: list,
                   output: Path, settings: Any, *, family: str | None = None, routing_layer: str | None = None,
                   pooling: str | None = None, feature_pooling: str | None = None, max_length: int | None = None,
                   include: list[str] | None = None, exclude: list[str] | None = None,
                   trust_pickle: bool = False, echo: Any = typer.echo) -> Path:
    """The whole build (also used by ``massmerge suite --export-artifact``); checks come before any SVD."""
    from massmerge.adapters import detect_family, get_adapter
    from massmerge.artifact import check_output_directory, factor_storage, float_dtype, to_storage, write_artifact
    from massmerge.mass.budget import stored_factors, tensor_bytes
    from massmerge.mass.config import make_serve_settings
    from massmerge.mass.model import check_parts
    from massmerge.mass.stream import build_factors
    from massmerge.merging.common import default_rank_fraction
    from massmerge.sources import resolve_source
    from massmerge.task_vectors import KeyFilter

    check_output_directory(output)  # before hours of work, not after
    base_path = resolve_source(str(base))
    fam = family or detect_family(base_path)
    loader = get_adapter(fam, routing_layer=routing_option(routing_layer))
    model = loader.load_model(str(base_path), trust_pickle=trust_pickle)
    special, length = text_facts(base_path, model, max_length) if fam == "text" else (None, None)
    adapter = get_adapter(fam, routing_layer=routing_option(routing_layer),
                          **adapter_options(fam, pooling, feature_pooling, special)).bind(model)
    layer = adapter.routing_layer(model)
    router = adapter.default_router(model)
    state = model.state_dict()
    encoder = {key: state[key] for key in adapter.encoder_keys(model)}
    width = adapter.feature_dim(model)
    if width is not None and head_width(head_modules[0]) != width:
        raise OptionError(f"--heads: the heads read {head_width(head_modules[0])} features; the model's "
                          f"features are {width} wide")
    check_experts(adapter, model, experts, encoder, trust_pickle)
    key_filter = KeyFilter.from_patterns(include, exclude)
    fraction = default_rank_fraction(len(experts), settings.rank_fraction)

    def open_expert(path: Path) -> Any:
        return adapter.load_weights(str(path), model, trust_pickle=trust_pickle)

    factors_before = build_factors(encoder, experts, names, rank_fraction=fraction, eps=settings.eps,
                                   svd=settings.svd, open_expert=open_expert, key_filter=key_filter)
    store = factor_storage(settings.factor_dtype, float_dtype(encoder))
    base_bytes = tensor_bytes(state.values())
    design_rank = total_rank(factors_before)
    stored = stored_factors(factors_before, head_modules, base_bytes, store, settings.max_size)  # consumes them
    del factors_before
    if stored.note:
        echo(f"note: {stored.note}", err=True)
    factors, scale = stored.factors, stored.rank_scale  # exactly what a later load() serves
    evidence = tuple(name for name in router["routing_layers"] if f"{name}.weight" in factors.matrices)
    serve = make_serve_settings(**{**router, "routing_layers": evidence or (layer,)}, max_length=length)
    check_parts(model, factors, head_modules, serve)  # what load() will build from these parts, checked now
    write_artifact(output, base_model=model, factors=to_storage(factors, store), heads=head_modules, serve=serve,
                   build=settings, adapter=adapter, tokenizer_dir=base_path if base_path.is_dir() else None,
                   factor_dtype=store, class_names=classes, rank_scale=scale)
    echo(summary(output, names, layer, store, settings, design_rank=design_rank, stored=factors,
                 unreachable=stored.note is not None))
    return Path(output)


def total_rank(factors: Any) -> int:
    """The sum of every task's rank over every matrix (what the size budget cuts)."""
    return sum(f.rank for per_task in factors.matrices.values() for f in per_task)


def summary(output: Path, names: list[str], layer: str, store: Any, settings: Any, *, design_rank: int,
            stored: Any, unreachable: bool) -> str:
    """The one line ``build`` ends with. Why so careful: it must never contradict itself (a rank "cut to
    100%", or a size above the budget it claims to fit), so the ranks are compared as stored and the size is
    measured on disk against the same base files the artifact holds."""
    from massmerge.artifact import artifact_bytes, base_file_bytes

    size = artifact_bytes(output) / base_file_bytes(output)
    budget = settings.max_size if settings.max_size is not None else DEFAULT_MAX_SIZE
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
