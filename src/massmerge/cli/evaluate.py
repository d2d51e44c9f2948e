"""``massmerge evaluate --config bench.yaml``: MASS and the baselines on a user's checkpoints and test sets.

The config names the base, one expert and one test set per task (hub ids, local HF directories, safetensors
files, PEFT LoRA directories; HF datasets or image folders); see ``examples/clip_vit_b32_8tasks.yaml``.
Writes ``report.json``, ``report.md`` and the plots to the output directory and prints the tables.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from massmerge.cli.app import command
from massmerge.cli.options import DEVICE_HELP, DTYPE_HELP, TRUST_PICKLE_HELP, check_positive
from massmerge.io.inputs import read_utf8_lines


@command("evaluate")
def evaluate_cmd(
    config: Annotated[Path, typer.Option(metavar="PATH", help="benchmark YAML (base, tasks: expert + dataset, "
                                                              "methods)")],
    output: Annotated[Path | None, typer.Option(metavar="PATH", help="report directory [default: the config's "
                                                                      "output]")] = None,
    methods: Annotated[str | None, typer.Option(metavar="A,B,...", help="comma-separated subset, e.g. "
                                                                        "experts,tsv_m,mass [default: the "
                                                                        "config's]")] = None,
    max_samples: Annotated[int | None, typer.Option(metavar="INT", help="per task, a seeded random subset of the "
                                                                        "test set [default: the config's]")] = None,
    batch_size: Annotated[int | None, typer.Option(metavar="INT", help="images per forward pass [default: the "
                                                                       "config's]")] = None,
    cache_dir: Annotated[Path | None, typer.Option(metavar="PATH", help="cached scores, so an interrupted run "
                                                                         "resumes [default: "
                                                                         "~/.cache/massmerge/evaluate]")] = None,
    device: Annotated[str | None, typer.Option(metavar="NAME", help=DEVICE_HELP)] = None,
    dtype: Annotated[str | None, typer.Option(metavar="DTYPE", help=DTYPE_HELP)] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help=TRUST_PICKLE_HELP)] = False,
) -> None:
    """Run the benchmark described by CONFIG and write report.json, report.md and the plots."""
    from massmerge.device import resolve_device, resolve_dtype
    from massmerge.experiments.evaluate import evaluate
    from massmerge.experiments.evaluate_config import load_benchmark_config

    check_positive("--max-samples", max_samples)
    check_positive("--batch-size", batch_size)
    read_utf8_lines(config)  # a non-UTF-8 byte names the file and line, before YAML sees it
    overrides: dict = {"output": str(output) if output else None, "trust_pickle": trust_pickle or None}
    if methods:
        overrides["methods"] = [m.strip() for m in methods.split(",") if m.strip()]
    bench = load_benchmark_config(config, **overrides)
    resolve_device(device)
    resolve_dtype(dtype)
    given = {"max_samples": max_samples, "batch_size": batch_size, "device": device, "dtype": dtype}
    if any(v is not None for v in given.values()):
        eval_opts = bench.eval.model_copy(update={k: v for k, v in given.items() if v is not None})
        bench = bench.model_copy(update={"eval": eval_opts})
    evaluate(bench, log=lambda line: print(line, file=sys.stderr), cache_dir=cache_dir)
    typer.echo(f"report written to {bench.output}/report.md")
