"""``massmerge serve ARTIFACT``: one MASS artifact behind an HTTP API, loaded once, batching live mixed-task
traffic (``POST /v1/predict``; docs/SERVING.md). ``--ray`` runs it as a Ray Serve deployment instead.

Binds to 127.0.0.1:8000 by default; another address needs ``--api-key`` (or ``$MASSMERGE_API_KEY``) or an
explicit ``--allow-no-key``. Every limit is a flag (massmerge/server/limits.py holds the defaults). SIGTERM or
Ctrl-C drains: in-flight requests are answered, then the process exits 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from massmerge.cli.app import command
from massmerge.cli.options import DEVICE_HELP, ROUTER_HELP, artifact_help, check_positive, with_serve_flags
from massmerge.errors import MassMergeError, OptionError
from massmerge.server.limits import API_KEY_ENV, DEFAULT_HOST, DEFAULT_PORT, LIMIT_HELP, ServerLimits, api_key_from


def _limit_help(field: str) -> str:
    return LIMIT_HELP[field]  # typer shows the default, read from ServerLimits


def _extra(name: str, module: str) -> None:
    """A one-line error naming the extra to install when ``module`` is missing."""
    try:
        __import__(module)
    except ImportError:
        raise MassMergeError(f"massmerge serve{' --ray' if name == 'ray' else ''}: needs the '{name}' extra "
                             f"(pip install 'massmerge[{name}]'); {module} is not installed") from None


@command("serve")
@with_serve_flags(artifact_help)
def serve_cmd(
    artifact: Annotated[Path, typer.Argument(metavar="ARTIFACT", help="artifact directory written by massmerge build")],
    host: Annotated[str, typer.Option(metavar="ADDR", help="address to bind; not loopback needs --api-key or "
                                                           "--allow-no-key")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(metavar="INT", help="port (0: a free one, printed)")] = DEFAULT_PORT,
    api_key: Annotated[str | None, typer.Option(metavar="KEY", help="require 'Authorization: Bearer KEY' on "
                                                "/v1/* and /metrics [default: $" + API_KEY_ENV + "]",
                                                show_default=False)] = None,
    allow_no_key: Annotated[bool, typer.Option("--allow-no-key", help="bind to a non-loopback address without "
                                               "an API key (anyone who reaches it can use the model)")] = False,
    max_batch_size: Annotated[int, typer.Option(metavar="INT", help=_limit_help("max_batch_size"))]
    = ServerLimits.max_batch_size,
    max_wait_ms: Annotated[float, typer.Option(metavar="MS", help=_limit_help("max_wait_ms"))]
    = ServerLimits.max_wait_ms,
    max_queue: Annotated[int, typer.Option(metavar="INT", help=_limit_help("max_queue"))] = ServerLimits.max_queue,
    max_body_bytes: Annotated[int, typer.Option(metavar="INT", help=_limit_help("max_body_bytes"))]
    = ServerLimits.max_body_bytes,
    max_inputs: Annotated[int, typer.Option(metavar="INT", help=_limit_help("max_inputs"))] = ServerLimits.max_inputs,
    max_input_chars: Annotated[int, typer.Option(metavar="INT", help=_limit_help("max_input_chars"))]
    = ServerLimits.max_input_chars,
    request_timeout_s: Annotated[float, typer.Option(metavar="S", help=_limit_help("request_timeout_s"))]
    = ServerLimits.request_timeout_s,
    grace_s: Annotated[float, typer.Option(metavar="S", help=_limit_help("grace_s"))] = ServerLimits.grace_s,
    router: Annotated[str | None, typer.Option(metavar="NAME", help=ROUTER_HELP)] = None,
    serve: dict[str, Any] | None = None,  # every serve setting's flag, as predict's (with_serve_flags)
    strategy: Annotated[str, typer.Option(metavar="NAME", help="second pass: auto, batched, grouped or "
                                                               "reference")] = "auto",
    device: Annotated[str | None, typer.Option(metavar="NAME", help=DEVICE_HELP)] = None,
    log_level: Annotated[str, typer.Option(metavar="NAME", help="uvicorn's log level: debug, info (one line "
                                                                "per request), warning")] = "warning",
    ray: Annotated[bool, typer.Option("--ray", help="run as a Ray Serve deployment (massmerge[ray]); "
                                                    "docs/SERVING.md")] = False,
    ray_address: Annotated[str | None, typer.Option(metavar="ADDR", help="--ray: the cluster to join [default: "
                                                    "$RAY_ADDRESS, else a local one]")] = None,
    num_replicas: Annotated[int, typer.Option(metavar="INT", help="--ray: replicas (ignored with "
                                              "--autoscaling)")] = 1,
    num_gpus: Annotated[float, typer.Option(metavar="FLOAT", help="--ray: GPUs per replica")] = 0.0,
    autoscaling: Annotated[str | None, typer.Option(metavar="JSON", help="--ray: Ray Serve autoscaling_config, "
                                                    "passed through, e.g. '{\"min_replicas\": 1, "
                                                    "\"max_replicas\": 4}' [default: none: --num-replicas "
                                                    "replicas]")] = None,
) -> None:
    """Serve a MASS artifact over HTTP: one model for every task, dynamically batched."""
    overrides = {key: value for key, value in (serve or {}).items() if value is not None}
    check_positive("--batch-size", overrides.get("batch_size"))
    check_positive("--max-length", overrides.get("max_length"))
    limits = ServerLimits(max_batch_size, max_wait_ms, max_queue, max_body_bytes, max_inputs, max_input_chars,
                          request_timeout_s, grace_s).checked()
    if not 0 <= port <= 65535:
        raise OptionError(f"--port: must be 0..65535 (got {port})")
    key = api_key_from(api_key)
    if ray:
        _serve_ray(artifact, limits, key, host, port, overrides, router=router, strategy=strategy, device=device,
                   allow_no_key=allow_no_key, address=ray_address, replicas=num_replicas, gpus=num_gpus,
                   autoscaling=autoscaling)
        return
    _extra("serve", "fastapi")
    _extra("serve", "uvicorn")
    from massmerge.artifact import read_manifest, serve_settings
    from massmerge.artifact.predictor import Predictor
    from massmerge.device import resolve_device
    from massmerge.server.app import ServerState, create_app
    from massmerge.server.run import address_of, check_exposure, listen, run

    warning = check_exposure(host, key, allow_no_key)
    target = resolve_device(device)
    serve_settings(read_manifest(artifact), router=None, **overrides)  # every flag checked before the model loads
    sock = listen(host, port)
    if warning:
        typer.echo(warning, err=True)
    notes: list[str] = []
    predictor = Predictor(artifact, router=router, strategy=strategy, device=target, note=notes.append, **overrides)
    state = ServerState()
    app = create_app(predictor, limits, api_key=key, state=state)
    device_line = next((n for n in notes if n.startswith("device:")), "device: ?")
    for note in notes:
        if not note.startswith("device:"):
            typer.echo(note, err=True)
    address = address_of(sock)
    typer.echo(f"massmerge serve: {artifact} on {address} ({predictor.kind}, {len(predictor.task_names)} tasks; "
               f"{device_line}; auth {'on' if key else 'off'}); docs at {address}/docs")
    sys.stdout.flush()
    run(app, sock, limits, state, log_level=log_level,
        on_drain=lambda: typer.echo("massmerge serve: draining (SIGTERM/SIGINT): answering in-flight requests, "
                                    f"then exiting (at most {limits.grace_s:g} s; a second signal exits now)",
                                    err=True))
    typer.echo("massmerge serve: stopped", err=True)


def _serve_ray(artifact: Path, limits: ServerLimits, key: str | None, host: str, port: int, overrides: dict[str, Any],
               *, router: str | None, strategy: str, device: str | None, allow_no_key: bool, address: str | None,
               replicas: int, gpus: float, autoscaling: str | None) -> None:
    _extra("ray", "ray")
    from massmerge.server.ray_serve import run_ray
    from massmerge.server.run import check_exposure

    warning = check_exposure(host, key, allow_no_key)
    if warning:
        typer.echo(warning, err=True)
    scaling = None
    if autoscaling is not None:
        try:
            scaling = json.loads(autoscaling)
        except json.JSONDecodeError as exc:
            raise OptionError(f"--autoscaling: not JSON ({exc.msg} at {exc.pos})") from None
        if not isinstance(scaling, dict):
            raise OptionError("--autoscaling: expected a JSON object")
    check_positive("--num-replicas", replicas)
    run_ray(artifact, limits, api_key=key, host=host, port=port, overrides=overrides, router=router,
            strategy=strategy, device=device, address=address, replicas=replicas, gpus=gpus, autoscaling=scaling,
            echo=lambda line: typer.echo(line))
