"""``massmerge build``: base + experts + heads -> a deployable MASS artifact directory.

Parses the flags, reads the heads files and makes the build settings (every option checked before the first
SVD), then runs :func:`massmerge.artifact.build.build_artifact`, which prints the closing summary line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from massmerge.adapter_options import ADAPTER_OPTIONS
from massmerge.choices import SVD_METHODS
from massmerge.cli.app import command
from massmerge.cli.options import (
    DEREDUNDANCY_HELP,
    DEVICE_HELP,
    DTYPE_HELP,
    EPS_HELP,
    MAX_SIZE_HELP,
    RANK_FRACTION_HELP,
    TRUST_PICKLE_HELP,
    check_positive,
)
from massmerge.errors import OptionError
from massmerge.mass.config import DEFAULT_EPS, check_pooling

POOLING, FEATURE_POOLING = ADAPTER_OPTIONS["pooling"], ADAPTER_OPTIONS["feature_pooling"]  # declared once


def routing_option(routing_layer: str | None) -> str | int | None:
    """``--routing-layer``: a module name or a block index."""
    if routing_layer is None:
        return None
    return int(routing_layer) if routing_layer.lstrip("-").isdigit() else routing_layer


@command("build")
def build_cmd(
    base: Annotated[Path, typer.Option(metavar="PATH", help="base model: HF model directory (or hub id)")],
    experts: Annotated[list[Path], typer.Option(metavar="PATH...", help="expert checkpoints (HF directories or "
                                                                         ".safetensors), at least 2")],
    output: Annotated[Path, typer.Option(metavar="PATH", help="artifact directory to write (atomically)")],
    heads: Annotated[list[Path] | None, typer.Option(metavar="PATH...", help="one heads .safetensors file per "
                                                     "expert (see README) [default: none, for experts "
                                                     "that generate: family seq2seq]")] = None,
    task_names: Annotated[list[str] | None, typer.Option(metavar="NAME...", help="task names [default: heads "
                                                                                   "metadata, else the expert's]")] = None,
    family: Annotated[str | None, typer.Option(metavar="NAME", help="model family: text, clip, open_clip, seq2seq "
                                                                    "[default: detected]")] = None,
    routing_layer: Annotated[str | None, typer.Option(metavar="NAME|INT", help="default routing nn.Linear (name or "
                                                                               "block index) [default: block "
                                                                               "round(0.75 depth)'s first MLP "
                                                                               "matrix]")] = None,
    pooling: Annotated[str | None, typer.Option(metavar=POOLING.metavar, help=f"default routing pooling: "
                                                f"{POOLING.help} [default: the family's]")] = None,
    feature_pooling: Annotated[str | None, typer.Option(metavar=FEATURE_POOLING.metavar, help=f"{FEATURE_POOLING.help}"
                                                        "; as the experts were trained [default: the text "
                                                        "family's]")] = None,
    max_length: Annotated[int | None, typer.Option(metavar="INT", help="text: tokens per input the experts were "
                                                                       "trained with [default: the model's "
                                                                       "positions]")] = None,
    rank_fraction: Annotated[float | None, typer.Option(metavar="FLOAT", help=RANK_FRACTION_HELP)] = None,
    eps: Annotated[float, typer.Option(metavar="FLOAT", help=EPS_HELP)] = DEFAULT_EPS,
    deredundancy: Annotated[bool, typer.Option("--deredundancy/--no-deredundancy", help=DEREDUNDANCY_HELP)] = True,
    svd: Annotated[str, typer.Option(metavar="|".join(SVD_METHODS), help="truncated SVD method")] = "auto",
    factor_dtype: Annotated[str, typer.Option(metavar="DTYPE", help="auto (float16 for 32-bit bases), float32, "
                                                                    "float16, bfloat16")] = "auto",
    max_size: Annotated[float | None, typer.Option(metavar="FLOAT", help=MAX_SIZE_HELP)] = None,
    include: Annotated[list[str] | None, typer.Option(metavar="GLOB...", help="only merge keys matching these globs")] = None,
    exclude: Annotated[list[str] | None, typer.Option(metavar="GLOB...", help="leave keys matching these globs at "
                                                                              "the base")] = None,
    device: Annotated[str | None, typer.Option(metavar="NAME", help="where the SVDs run: " + DEVICE_HELP)] = None,
    dtype: Annotated[str | None, typer.Option(metavar="DTYPE", help="the artifact's default " + DTYPE_HELP)] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help=TRUST_PICKLE_HELP)] = False,
) -> None:
    """Build a MASS artifact: the base, each expert's factors, non-matrix deltas, heads and a manifest."""
    from massmerge.artifact.build import build_artifact
    from massmerge.device import resolve_device, resolve_dtype
    from massmerge.heads.files import read_heads_files
    from massmerge.mass.config import make_build_settings
    from massmerge.memory import tune_allocator_for_streaming

    tune_allocator_for_streaming()  # flat peak memory while experts stream through (massmerge/memory.py)
    if len(experts) < 2:
        raise OptionError(f"--experts: MASS needs at least 2 experts, got {len(experts)}")
    check_positive("--max-length", max_length)
    settings = make_build_settings(rank_fraction=rank_fraction, eps=eps if deredundancy else None, svd=svd,
                                   factor_dtype=factor_dtype, max_size=max_size)
    check_pooling(pooling)
    resolve_dtype(dtype)
    target = resolve_device(device)
    from massmerge.adapters import detect_family
    from massmerge.sources import resolve_source

    if (family or detect_family(resolve_source(str(base)))) == "seq2seq":
        from massmerge.artifact.build import build_generating

        if heads:
            raise OptionError("--heads: family seq2seq generates text; its artifact takes no heads")
        build_generating(base, experts, task_names, output, settings, routing_layer=routing_option(routing_layer),
                         pooling=pooling, max_length=max_length, include=include, exclude=exclude,
                         trust_pickle=trust_pickle, dtype=dtype, echo=typer.echo)
        return
    if not heads:
        raise OptionError("--heads: one heads file per expert is needed (only family seq2seq builds without)")
    head_set = read_heads_files(heads, task_names, experts)
    build_artifact(base, experts, head_set, output, settings, family=family, routing_layer=routing_option(routing_layer),
                   pooling=pooling, feature_pooling=feature_pooling, max_length=max_length, include=include,
                   exclude=exclude, trust_pickle=trust_pickle, device=None if target.type == "cpu" else target,
                   dtype=dtype, echo=typer.echo)
