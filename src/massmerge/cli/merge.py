"""``massmerge merge``: one static merge of a base and its experts into a flat safetensors state dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from massmerge import merging
from massmerge.checkpoints import _is_pickle_source as is_pickle_source
from massmerge.checkpoints import check_finite, load_state_dict, open_checkpoint, save_state_dict, validate_compatible
from massmerge.cli import app
from massmerge.errors import OptionError
from massmerge.sources import resolve_source
from massmerge.task_vectors import CheckedTaskVector, KeyFilter


def open_expert(path: Path, base: dict, *, trust_pickle: bool) -> Any:
    """Open an expert lazily (safetensors) or load it (trusted pickle) and check its keys, shapes and dtypes
    against the base from the header alone; its values are checked as the merge reads them (CheckedTaskVector),
    so each tensor is read once, not once to validate and once to merge."""
    expert = load_state_dict(path, trust_pickle=True) if trust_pickle and is_pickle_source(path) \
        else open_checkpoint(path)
    validate_compatible(base, expert, name=str(path))
    return expert


def method_kwargs(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """Keep the options the user set; refuse any that the method does not take (named as the CLI flag)."""
    accepted = set(merging.method_options(method))
    kwargs = {}
    for name, value in given.items():
        if value is None:
            continue
        if name not in accepted:
            flag = "ties-density" if name == "density" else name.replace("_", "-")  # the CLI's spelling
            raise OptionError(f"--{flag} does not apply to --method {method}")
        kwargs[name] = value
    return kwargs


@app.command("merge")
def merge_cmd(
    method: Annotated[str, typer.Option(help=f"one of {', '.join(merging.MERGE_METHODS)}")],
    base: Annotated[Path, typer.Option(help="base checkpoint: .safetensors file, HF model directory or hub id org/name[@rev]")],
    experts: Annotated[list[Path], typer.Option(help="expert checkpoints (files, directories or hub ids), one per task, at least 2")],
    output: Annotated[Path, typer.Option(help="output .safetensors file (written atomically)")],
    alpha: Annotated[float | None, typer.Option(help="scale of the merged delta (method default if unset)")] = None,
    rank_fraction: Annotated[float | None, typer.Option(help="tsv_m/tsv_c: kept rank fraction (default 1/T)")] = None,
    ties_density: Annotated[float | None, typer.Option(help="ties: kept fraction per task (default 0.2)")] = None,
    common_fraction: Annotated[float | None, typer.Option(help="iso_cts: common subspace (default 0.8)")] = None,
    task: Annotated[int | None, typer.Option(help="tsv_c: index of the task to reconstruct")] = None,
    include: Annotated[list[str] | None, typer.Option(help="only merge keys matching these globs")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="leave keys matching these globs at the base")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="allow .bin/.pt files (weights-only load)")] = False,
) -> None:
    """Merge EXPERTS into BASE with METHOD and write a safetensors state dict with the base's keys and dtypes."""
    merging.get_merge_method(method)
    if output.suffix != ".safetensors":
        raise OptionError(f"--output '{output}' must end in .safetensors")
    if len(experts) < 2:
        raise OptionError(f"--experts: need at least 2 experts to merge, got {len(experts)}")
    inputs = {p.resolve() for p in [base, *experts]}
    if output.resolve() in inputs:
        raise OptionError(f"--output '{output}' is one of the inputs; refusing to overwrite it")
    kwargs = method_kwargs(method, {"alpha": alpha, "rank_fraction": rank_fraction, "density": ties_density,
                                    "common_fraction": common_fraction, "task": task})
    if method == "tsv_c" and task is None:
        raise OptionError("--task is required for --method tsv_c")
    base, experts = resolve_source(base), [resolve_source(p) for p in experts]  # local path, or hub id -> snapshot
    base_state = load_state_dict(base, trust_pickle=trust_pickle)
    check_finite(base_state, name=str(base))
    key_filter = KeyFilter.from_patterns(include, exclude)
    opened = [open_expert(p, base_state, trust_pickle=trust_pickle) for p in experts]
    task_vectors = [CheckedTaskVector(base_state, expert, name=str(path), key_filter=key_filter)
                    for path, expert in zip(experts, opened)]
    if not len(task_vectors[0]):
        raise OptionError("--include/--exclude: no floating-point key is left to merge")
    merged = merging.merge(method, base_state, task_vectors, **kwargs)
    metadata = {"massmerge_method": method, "massmerge_options": json.dumps(kwargs),
                "massmerge_experts": json.dumps([str(p) for p in experts])}
    save_state_dict(merged, output, metadata=metadata)
    typer.echo(f"wrote {output} ({method}, {len(experts)} experts, {len(merged)} tensors)")
