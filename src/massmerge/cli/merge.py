"""``massmerge merge``: one static merge of a base and its experts into a flat safetensors state dict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from massmerge.cli.app import command
from massmerge.cli.options import DEVICE_HELP, RANK_FRACTION_HELP, TRUST_PICKLE_HELP
from massmerge.errors import OptionError
from massmerge.merging.names import DEFAULT_ALPHA, ISO_CTS_COMMON_FRACTION, METHOD_NAMES, TIES_DENSITY


def method_kwargs(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """Keep the options the user set; refuse any that the method does not take (named as the CLI flag)."""
    from massmerge import merging

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


@command("merge")
def merge_cmd(
    method: Annotated[str, typer.Option(metavar="NAME", help=f"one of {', '.join(METHOD_NAMES)}")],
    base: Annotated[Path, typer.Option(metavar="PATH", help="base checkpoint: .safetensors file, HF model "
                                                            "directory or hub id org/name[@rev]")],
    experts: Annotated[list[Path], typer.Option(metavar="PATH...", help="expert checkpoints (files, directories "
                                                                        "or hub ids), one per task, at least 2")],
    output: Annotated[Path, typer.Option(metavar="PATH", help="output .safetensors file (written atomically)")],
    alpha: Annotated[float | None, typer.Option(metavar="FLOAT", help="scale of the merged delta [default: "
                                                                      f"{DEFAULT_ALPHA}; "
                                                                      "task_arithmetic: by the number of tasks; "
                                                                      "weight_average: unused]")] = None,
    rank_fraction: Annotated[float | None, typer.Option(metavar="FLOAT", help="tsv_m/tsv_c: "
                                                                              + RANK_FRACTION_HELP)] = None,
    ties_density: Annotated[float | None, typer.Option(metavar="FLOAT", help="ties: kept fraction of each task "
                                                                             "vector [default: "
                                                                             f"{TIES_DENSITY}]")] = None,
    common_fraction: Annotated[float | None, typer.Option(metavar="FLOAT", help="iso_cts: fraction of the "
                                                                                "spectrum in the common subspace "
                                                                                "[default: "
                                                                                f"{ISO_CTS_COMMON_FRACTION}]")] = None,
    task: Annotated[int | None, typer.Option(metavar="INT", help="tsv_c: index of the task to reconstruct "
                                                                 "(required for tsv_c)")] = None,
    include: Annotated[list[str] | None, typer.Option(metavar="GLOB...", help="only merge keys matching these "
                                                                              "globs")] = None,
    exclude: Annotated[list[str] | None, typer.Option(metavar="GLOB...", help="leave keys matching these globs "
                                                                              "at the base")] = None,
    device: Annotated[str | None, typer.Option(metavar="NAME", help=DEVICE_HELP)] = None,
    dtype: Annotated[str | None, typer.Option(metavar="DTYPE", help="dtype of the merged checkpoint: float32, "
                                                                    "float16 or bfloat16 [default: the base's]")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help=TRUST_PICKLE_HELP)] = False,
) -> None:
    """Merge EXPERTS into BASE with METHOD and write a safetensors state dict with the base's keys and dtypes."""
    from massmerge import merging
    from massmerge.device import describe as describe_device
    from massmerge.device import resolve_device, resolve_dtype
    from massmerge.memory import tune_allocator_for_streaming
    from massmerge.merging.files import merge_files

    tune_allocator_for_streaming()  # flat peak memory while experts stream through (massmerge/memory.py)

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
    target, cast = resolve_device(device), resolve_dtype(dtype, option="--dtype")
    if target.type != "cpu":
        typer.echo(f"note: merging on {describe_device(target)}", err=True)
    count = merge_files(method, base, experts, output, options=kwargs, include=include, exclude=exclude,
                        trust_pickle=trust_pickle, device=None if target.type == "cpu" else target, dtype=cast)
    typer.echo(f"wrote {output} ({method}, {len(experts)} experts, {count} tensors)")
