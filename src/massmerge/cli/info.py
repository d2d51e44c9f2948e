"""``massmerge info``: what a checkpoint or a MASS artifact holds, read without loading tensors.

For a checkpoint (safetensors file or HF directory): every key with its shape, dtype and size. For an artifact
directory: a summary of its manifest (tasks, build and serve settings, heads, files) and the tensors of each
of its safetensors files; the manifest is validated first, as ``load`` does, so a broken artifact is one error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from massmerge.cli.app import command
from massmerge.errors import MassMergeError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


@command("info")
def info_cmd(
    path: Annotated[Path, typer.Argument(metavar="PATH", help=".safetensors file, HF model directory or MASS "
                                                              "artifact directory")],
) -> None:
    """List what PATH holds: every tensor with its shape, dtype and size (and an artifact's manifest)."""
    from rich.console import Console

    console = Console(soft_wrap=True)
    if path.is_dir() and (path / "manifest.json").exists():
        _artifact_info(path, console)
        return
    from massmerge.checkpoints import open_checkpoint

    console.print(_tensor_table(str(path), open_checkpoint(path)))


def _tensor_table(title: str, checkpoint: Any) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in ("key", "shape", "dtype", "params", "size"):
        table.add_column(column, justify="right" if column in ("params", "size") else "left")
    total_params = total_bytes = 0
    for key in checkpoint:
        shape, dtype = checkpoint.shape(key), checkpoint.dtype_name(key)
        params = math.prod(shape)
        size = params * DTYPE_BYTES.get(dtype, 4)
        total_params += params
        total_bytes += size
        table.add_row(key, str(list(shape)), dtype, f"{params:,}", human_bytes(size))
    table.add_section()
    table.add_row(f"{len(checkpoint)} tensors", "", "", f"{total_params:,}", human_bytes(total_bytes))
    return table


def _artifact_info(path: Path, console: Any) -> None:
    """Manifest summary and the tensors of every safetensors file of a verified artifact."""
    from massmerge.artifact import read_manifest, verify_files
    from massmerge.checkpoints import open_checkpoint

    manifest = read_manifest(path)
    verify_files(path, manifest)
    serve = manifest.serve
    lines = [
        f"MASS artifact {path} (format {manifest.format_version}, massmerge {manifest.massmerge_version})",
        f"tasks ({len(manifest.task_names)}): {', '.join(manifest.task_names)}",
        f"architecture: {manifest.architecture.kind} {manifest.architecture.adapter or ''}".rstrip()
        + f"; base {manifest.base.mode} ({manifest.base.dtype})",
        f"build: rank fraction {manifest.rank_fraction:.4g} ({_kept_ranks(path, manifest)}), eps "
        f"{manifest.build.eps}, svd {manifest.build.svd}, factors {manifest.factor_dtype}; "
        f"{len(manifest.ranks)} matrices, {len(manifest.non_matrix_keys)} other keys",
        f"serve defaults: {_layers_text(serve)}; pooling {serve.pooling or 'family'}; "
        f"mode {serve.mode}, eta {serve.eta}, K {serve.top_k}, tau {serve.tau}, heads {serve.head_rule}, "
        f"alpha {serve.alpha}, max length {serve.max_length}",
        "heads: " + ", ".join(f"{h.task} ({h.kind}, {h.num_classes} classes)" for h in manifest.heads),
        f"files: {len(manifest.files)}, {human_bytes(sum(e.bytes for e in manifest.files.values()))}",
    ]
    for line in lines:
        console.print(line, markup=False, highlight=False)
    for name in manifest.files:
        if name.endswith(".safetensors"):
            console.print(_tensor_table(name, open_checkpoint(path / name)))


def _layers_text(serve: Any) -> str:
    """The routing layers in brief: a multi-layer router routes on dozens of matrices."""
    layers = serve.routing_layers
    if len(layers) <= 2:
        return f"routing layers {', '.join(layers)}"
    return f"{len(layers)} routing layers ({layers[0]} ... {layers[-1]}, {serve.layer_combine})"


def _kept_ranks(path: Path, manifest: Any) -> str:
    """How much of the design rank (``rank_fraction`` of each matrix) the stored factors keep, from the factor
    shapes in the header: the honest figure (a build's size budget cuts ranks by a bisected scale that may
    read as 100% while every rank lost a direction)."""
    from massmerge.artifact.manifest import FACTORS_FILE, factor_name
    from massmerge.checkpoints import open_checkpoint
    from massmerge.lowrank import rank_for

    factors = open_checkpoint(path / FACTORS_FILE)
    task = manifest.task_names[0]
    design = kept = 0
    for key, ranks in manifest.ranks.items():
        names = [factor_name(task, key, part) for part in "UV"]
        missing = [name for name in names if name not in factors or len(factors.shape(name)) != 2]
        if missing:
            raise MassMergeError(f"{path / FACTORS_FILE}: tensor '{missing[0]}' is missing or not a matrix")
        m, n = (factors.shape(name)[0] for name in names)
        design += len(ranks) * rank_for((m, n), manifest.rank_fraction)
        kept += sum(ranks)
    if not design or kept >= design:
        return "design ranks"
    return f"stored ranks {math.floor(100 * kept / design)}% of the design ranks"
