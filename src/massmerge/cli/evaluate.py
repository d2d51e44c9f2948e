"""``massmerge evaluate --config bench.yaml``: MASS and the baselines on a user's checkpoints and test sets.

The config names the base, one expert and one test set per task (hub ids, local HF directories, safetensors
files, PEFT LoRA directories; HF datasets or image folders); see ``examples/clip_vit_b32_8tasks.yaml``.
Writes ``report.json`` and ``report.md`` to the output directory and prints the table.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from massmerge.cli import app


@app.command("evaluate")
def evaluate_cmd(
    config: Annotated[Path, typer.Option(help="benchmark YAML (base, tasks: expert + dataset, methods)")],
    output: Annotated[Path | None, typer.Option(help="report directory (default: the config's output)")] = None,
    methods: Annotated[str | None, typer.Option(help="comma-separated subset, e.g. experts,tsv_m,mass")] = None,
    max_samples: Annotated[int | None, typer.Option(min=1, help="per task, a seeded random subset of the test set")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="images per forward pass")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="allow .bin/.pt checkpoints (weights-only load)")] = False,
) -> None:
    """Run the benchmark described by CONFIG and write report.json / report.md."""
    from massmerge.benchmark import markdown_report, run_benchmark, write_report
    from massmerge.benchmark_config import load_benchmark_config

    overrides: dict = {"output": str(output) if output else None, "trust_pickle": trust_pickle or None}
    if methods:
        overrides["methods"] = [m.strip() for m in methods.split(",") if m.strip()]
    bench = load_benchmark_config(config, **overrides)
    if max_samples is not None or batch_size is not None:
        eval_opts = bench.eval.model_copy(update={k: v for k, v in
                                                  {"max_samples": max_samples, "batch_size": batch_size}.items() if v})
        bench = bench.model_copy(update={"eval": eval_opts})
    report = run_benchmark(bench, log=lambda line: print(line, file=sys.stderr))
    json_path, md_path = write_report(report, bench.output)
    typer.echo(markdown_report(report))
    typer.echo(f"wrote {json_path} and {md_path}")
