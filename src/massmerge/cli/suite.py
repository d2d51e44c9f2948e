"""``massmerge suite``: the offline benchmark (design.md section 6) on the embedded MiniLM expert zoo."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from massmerge.cli import app
from massmerge.errors import OptionError

DEFAULT_CACHE = Path.home() / ".cache" / "massmerge" / "suite"


def _threads(threads: int | None) -> int:
    """All cores by default: the suite is CPU-bound and runs alone."""
    import torch

    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    return count


@app.command("suite")
def suite_cmd(
    preset: Annotated[str, typer.Option(help="ci (4 tasks, <10 min on 2 cores), default (8 tasks) or wide (12)")] = "default",
    out: Annotated[Optional[Path], typer.Option(help="report folder [default: massmerge-suite/PRESET]")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="npm tarball + apt snapshot folder (scripts/setup_data.sh)")] = None,
    cache_dir: Annotated[Path, typer.Option(help="cached experts and evaluation results")] = DEFAULT_CACHE,
    tasks: Annotated[Optional[str], typer.Option(help="comma-separated task names instead of the preset's")] = None,
    steps: Annotated[Optional[int], typer.Option(help="fine-tuning steps per expert (preset's by default)")] = None,
    n_test: Annotated[Optional[int], typer.Option(help="test items per task (preset's by default)")] = None,
    routing_layer: Annotated[Optional[str], typer.Option(help="routing matrix [default: block round(0.75 depth) MLP]")] = None,
    mass_layer: Annotated[Optional[list[str]], typer.Option(help="extra routing layers scored with full MASS")] = None,
    eta: Annotated[float, typer.Option(help="router probability threshold")] = 0.2,
    top_k: Annotated[int, typer.Option(help="at most K tasks per sample")] = 3,
    eps: Annotated[float, typer.Option(help="de-redundancy threshold (negative = off)")] = 0.3,
    rank_scale: Annotated[float, typer.Option(help="keep this fraction of every task's MASS rank (as build "
                                                   "--max-size cuts it)")] = 1.0,
    threads: Annotated[Optional[int], typer.Option(help="torch threads [default: all cores]")] = None,
    seed: Annotated[int, typer.Option(help="split and training seed")] = 0,
) -> None:
    """Build the expert zoo (cached), evaluate zero-shot, experts, every static merge and MASS; write the report."""
    from massmerge.suite import PRESET_FINETUNE, SuiteConfig, run_suite

    if steps is not None and steps < 1:
        raise OptionError(f"--steps must be >= 1, got {steps}")
    if n_test is not None and n_test < 1:
        raise OptionError(f"--n-test must be >= 1, got {n_test}")
    if not 0.0 < rank_scale <= 1.0:
        raise OptionError(f"--rank-scale must be in (0, 1], got {rank_scale}")
    from massmerge.mass.config import make_config

    # fail before an hour of fine-tuning, not after it: the router options are checked up front
    make_config(routing_layer=routing_layer or "default", eta=eta, top_k=top_k, eps=None if eps < 0 else eps)
    _threads(threads)
    finetune = PRESET_FINETUNE.get(preset, PRESET_FINETUNE["default"])
    finetune = finetune.model_copy(update={"seed": seed, **({"steps": steps} if steps else {})})
    config = SuiteConfig(
        preset=preset, tasks=tuple(tasks.split(",")) if tasks else None, n_test=n_test, finetune=finetune,
        routing_layer=routing_layer, mass_layers=tuple(mass_layer or ()), eps=None if eps < 0 else eps, eta=eta,
        top_k=top_k, seed=seed, rank_scale=rank_scale,
    )  # fmt: skip
    out_dir = out or Path("massmerge-suite") / preset
    run_suite(config, data_root=data_dir, cache_dir=cache_dir, out_dir=out_dir)
    typer.echo(f"report written to {out_dir}/report.md")
