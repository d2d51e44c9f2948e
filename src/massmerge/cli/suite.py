"""``massmerge suite``: the offline benchmark (design.md section 6) on the embedded MiniLM expert zoo.

Every option is checked before the first fine-tuning step (a typo must not cost an hour): the numbers, the
serve settings and the routing layers, which are looked up in the backbone itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from massmerge.cli.app import command
from massmerge.cli.options import (
    DEREDUNDANCY_HELP,
    DEVICE_HELP,
    DTYPE_HELP,
    EPS_HELP,
    MAX_SIZE_HELP,
    ROUTER_HELP,
    check_positive,
    engine_help,
)
from massmerge.errors import OptionError
from massmerge.mass.config import DEFAULT_EPS

DEFAULT_CACHE = Path.home() / ".cache" / "massmerge" / "suite"


def _threads(threads: int | None) -> int:
    """All cores by default: the suite is CPU-bound and runs alone."""
    import torch

    check_positive("--threads", threads)
    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    return count


def check_routing_layers(layers: list[str]) -> None:
    """Every named routing layer is an ``nn.Linear`` of the backbone (checked before any fine-tuning)."""
    if not layers:
        return
    from massmerge.adapters.base import check_linear
    from massmerge.experiments.finetune import load_backbone
    from massmerge.progress import quiet_third_party

    with quiet_third_party():
        model = load_backbone().model
    for layer in layers:
        try:
            check_linear(model, layer)
        except OptionError as exc:
            raise OptionError(f"--routing-layer: {str(exc).removeprefix('routing_layer: ')}") from None


@command("suite")
def suite_cmd(
    preset: Annotated[str | None, typer.Option(metavar="NAME", help="distinct (the paper's design: each task its own "
                                                             "source), overlap (look-alike inputs), ci (4 "
                                                             "tasks, minutes) or wide [default: distinct]")] = None,
    output: Annotated[Path | None, typer.Option(metavar="PATH", help="report folder [default: "
                                                                     "massmerge-suite/PRESET]")] = None,
    export_artifact: Annotated[Path | None, typer.Option(metavar="PATH", help="also write the served MASS model "
                                                                              "as an artifact here (for massmerge "
                                                                              "predict)")] = None,
    data_dir: Annotated[Path | None, typer.Option(metavar="PATH", help="npm tarball + apt snapshot folder "
                                                                       "(scripts/setup_data.sh)")] = None,
    cache_dir: Annotated[Path, typer.Option(metavar="PATH", help="cached experts and evaluation results")] = DEFAULT_CACHE,
    tasks: Annotated[str | None, typer.Option(metavar="A,B,...", help="comma-separated task names instead of "
                                                                      "the preset's")] = None,
    steps: Annotated[int | None, typer.Option(metavar="INT", help="fine-tuning steps per expert [default: the "
                                                                  "preset's]")] = None,
    n_test: Annotated[int | None, typer.Option(metavar="INT", help="test items per task [default: the "
                                                                   "preset's]")] = None,
    routing_layer: Annotated[list[str] | None, typer.Option(metavar="NAME", help="routing nn.Linear (repeat for "
                                                                                 "multi-layer routing) [default: "
                                                                                 "block round(0.75 depth)'s first "
                                                                                 "MLP matrix]")] = None,
    mass_layer: Annotated[list[str] | None, typer.Option(metavar="NAME", help="extra routing layers scored with "
                                                                              "the full MASS model")] = None,
    router: Annotated[str | None, typer.Option(metavar="NAME", help=ROUTER_HELP)] = None,
    pooling: Annotated[str | None, typer.Option(metavar="NAME", help=engine_help("pooling", "the text family's"))] = None,
    layer_combine: Annotated[str | None, typer.Option(metavar="NAME", help=engine_help(
        "layer_combine", "the family's: ppca for text, one layer for vision"))] = None,
    head_rule: Annotated[str | None, typer.Option(metavar="NAME", help=engine_help("head_rule"))] = None,
    eta: Annotated[float | None, typer.Option(metavar="FLOAT", help=engine_help("eta"))] = None,
    top_k: Annotated[int | None, typer.Option(metavar="INT", help=engine_help("top_k"))] = None,
    restart_block: Annotated[int | None, typer.Option(metavar="INT", help=engine_help("restart_block"))] = None,
    frontier: Annotated[bool, typer.Option("--frontier/--no-frontier", help="score every restart block and "
                                                                            "earlier routing layers: accuracy "
                                                                            "against throughput")] = False,
    eps: Annotated[float, typer.Option(metavar="FLOAT", help=EPS_HELP)] = DEFAULT_EPS,
    deredundancy: Annotated[bool, typer.Option("--deredundancy/--no-deredundancy", help=DEREDUNDANCY_HELP)] = True,
    max_size: Annotated[float | None, typer.Option(metavar="FLOAT", help=MAX_SIZE_HELP)] = None,
    ablation: Annotated[bool, typer.Option("--ablation/--no-ablation", help="score the router variants on the "
                                                                            "validation and test splits")] = True,
    smile: Annotated[bool, typer.Option("--smile/--no-smile", help="score SMILE-2 (oracle head and max-logit), "
                                                                    "its storage and serving cost")] = True,
    routers: Annotated[bool, typer.Option("--routers/--no-routers", help="the router study: routers trained on "
                                                                          "labelled val inputs, proj-PRE, the "
                                                                          "identifiability ceiling")] = True,
    batch_routing: Annotated[bool, typer.Option("--batch-routing/--no-batch-routing", help="the paper's batch "
                                                                                          "routing row")] = True,
    scaling: Annotated[bool | None, typer.Option("--scaling/--no-scaling", help="the task-scaling curve (T = 2..16, "
                                                                               "3 seeded subsets each) [default: "
                                                                               "on for the wide preset]")] = None,
    threads: Annotated[int | None, typer.Option(metavar="INT", help="torch threads [default: all cores]")] = None,
    seed: Annotated[int, typer.Option(metavar="INT", help="split and training seed")] = 0,
    device: Annotated[str | None, typer.Option(metavar="NAME", help="where experts train and every method is "
                                                                    "scored: " + DEVICE_HELP)] = None,
    dtype: Annotated[str | None, typer.Option(metavar="DTYPE", help=DTYPE_HELP)] = None,
) -> None:
    """Build the expert zoo (cached), evaluate zero-shot, experts, every static merge and MASS; write the report."""
    from massmerge.data.tasks import DEFAULT_PRESET, TASKS, get_preset
    from massmerge.mass.config import ROUTER_PROFILES, make_build_settings, make_serve_settings
    from massmerge.experiments.suite import SuiteConfig, preset_finetune, run_suite
    from massmerge.smile import SmileSettings

    check_positive("--steps", steps)
    check_positive("--n-test", n_test)
    preset = preset or DEFAULT_PRESET
    get_preset(preset)
    unknown = [name for name in (tasks.split(",") if tasks else []) if name not in TASKS]
    if unknown:
        raise OptionError(f"--tasks: unknown task '{unknown[0]}' (choose from {', '.join(TASKS)})")
    build = make_build_settings(eps=eps if deredundancy else None, max_size=max_size)
    if router is not None and router not in ROUTER_PROFILES:
        raise OptionError(f"--router: unknown rule '{router}' (choose {', '.join(ROUTER_PROFILES)})")
    serve: dict[str, Any] = {k: v for k, v in {"pooling": pooling, "layer_combine": layer_combine,
                                               "head_rule": head_rule, "eta": eta, "top_k": top_k,
                                               "restart_block": restart_block}.items()
                             if v is not None}
    if routing_layer and len(routing_layer) > 1:  # several: exactly these; one: the exit layer of the default
        serve["routing_layers"] = tuple(routing_layer)
    make_serve_settings(routing_layers=("checked below",), **serve)  # every serve flag checked up front
    check_routing_layers([*(routing_layer or []), *(mass_layer or [])])
    _threads(threads)
    from massmerge.device import describe as describe_device
    from massmerge.device import resolve_device, resolve_dtype

    target = resolve_device(device)
    resolve_dtype(dtype)
    typer.echo(f"device: {describe_device(target)}", err=True)
    finetune = preset_finetune(preset).model_copy(update={"seed": seed, **({"steps": steps} if steps else {})})
    config = SuiteConfig(
        preset=preset, tasks=tuple(tasks.split(",")) if tasks else None, n_test=n_test, finetune=finetune,
        routing_layer=routing_layer[-1] if routing_layer else None, mass_layers=tuple(mass_layer or ()),
        eps=build.eps, max_size=build.max_size, router=router, serve=serve, ablation=ablation, frontier=frontier,
        smile=SmileSettings() if smile else None, routers=routers, batch_routing=batch_routing, scaling=scaling,
        seed=seed,
        device=None if target.type == "cpu" else str(target), dtype=dtype,
    )  # fmt: skip
    out_dir = output or Path("massmerge-suite") / preset
    typer.echo(f"report will be written to {out_dir}/report.md", err=True)
    run_suite(config, data_root=data_dir, cache_dir=cache_dir, out_dir=out_dir, export_artifact=export_artifact)
    typer.echo(f"report written to {out_dir}/report.md")
    if export_artifact is not None:
        typer.echo(f"artifact written to {export_artifact} (serve it: massmerge predict {export_artifact} INPUTS)")
