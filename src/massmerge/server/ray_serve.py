"""The same server as a Ray Serve deployment: replicas over GPUs and machines, batching by ``@serve.batch``,
autoscaling passed through (``massmerge serve ART --ray``, or ``serve run massmerge.server.ray_serve:app_builder
artifact=ART``; docs/SERVING.md).

Each replica loads the :class:`Predictor` once and serves the very app of ``massmerge serve`` (same endpoints,
checks, errors, auth and metrics); only the batching differs: Ray's ``@serve.batch`` collects requests (its
``batch_size_fn`` counts inputs, not requests, against ``--max-batch-size``), then requests are grouped by
their settings and each group runs as one window, as in the local server. Back-pressure is Ray's:
``max_queued_requests`` per replica (from ``--max-queue``, counted in requests), then 503.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import serve

from massmerge.server.limits import ServerLimits

APP_NAME = "massmerge"


def _count_inputs(requests: list[tuple[list[Any], dict[str, Any]]]) -> int:
    return sum(len(inputs) for inputs, _ in requests)


class MassReplica:
    """One replica: the artifact loaded once, the server's FastAPI app as its ingress."""

    def __init__(self, artifact: str, limits: ServerLimits, api_key: str | None, overrides: dict[str, Any],
                 router: str | None = None, strategy: str = "auto", device: str | None = None) -> None:
        from massmerge.artifact.predictor import Predictor
        from massmerge.device import resolve_device

        self.limits, self.api_key = limits, api_key
        self.predictor = Predictor(artifact, router=router, strategy=strategy, device=resolve_device(device),
                                   **overrides)
        self.batched.set_max_batch_size(limits.max_batch_size)
        self.batched.set_batch_wait_timeout_s(limits.max_wait_ms / 1000.0)

    def __serve_build_asgi_app__(self) -> Any:
        from massmerge.server.app import create_app

        return create_app(self.predictor, self.limits, api_key=self.api_key, submit=self.submit)

    async def submit(self, inputs: list[Any], settings: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
        result = await asyncio.wait_for(self.batched((inputs, settings)), timeout)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=ServerLimits.max_batch_size, batch_wait_timeout_s=ServerLimits.max_wait_ms / 1000.0,
                 batch_size_fn=_count_inputs)
    async def batched(self, requests: list[tuple[list[Any], dict[str, Any]]]) -> list[Any]:
        from massmerge.server.app import answer

        return await asyncio.to_thread(answer, self.predictor, requests)  # torch off the replica's event loop


# the ingress app is built by each replica (__serve_build_asgi_app__), around the predictor it loaded
MassDeployment = serve.deployment(name="MassMerge")(serve.ingress()(MassReplica))


def application(artifact: str | Path, limits: ServerLimits, *, api_key: str | None = None,
                overrides: dict[str, Any] | None = None, router: str | None = None, strategy: str = "auto",
                device: str | None = None, replicas: int = 1, gpus: float = 0.0,
                autoscaling: dict[str, Any] | None = None) -> Any:
    """The bound Ray Serve application (replicas, GPUs and autoscaling as Ray takes them)."""
    options: dict[str, Any] = {"ray_actor_options": {"num_gpus": gpus},
                               "max_queued_requests": max(1, limits.max_queue // max(1, limits.max_inputs)),  # requests, not inputs
                               "max_ongoing_requests": max(1, 2 * limits.max_batch_size),
                               "graceful_shutdown_timeout_s": limits.grace_s}
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
        options["num_replicas"] = "auto"
    else:
        options["num_replicas"] = replicas
    cleaned = {key: value for key, value in (overrides or {}).items() if value is not None}
    return MassDeployment.options(**options).bind(str(Path(artifact).resolve()), limits, api_key, cleaned, router,
                                                  strategy, device)


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run massmerge.server.ray_serve:app_builder artifact=ART [api_key=...] [replicas=N]
    [gpus=F]``: the application from ``key=value`` arguments."""
    from massmerge.errors import OptionError
    from massmerge.server.limits import api_key_from

    if "artifact" not in args:
        raise OptionError("artifact=: the artifact directory is required")
    return application(args["artifact"], ServerLimits().checked(), api_key=api_key_from(args.get("api_key")),
                       replicas=int(args.get("replicas", 1)), gpus=float(args.get("gpus", 0.0)))


def run_ray(artifact: Path, limits: ServerLimits, *, api_key: str | None, host: str, port: int,
            overrides: dict[str, Any], router: str | None, strategy: str, device: str | None, address: str | None,
            replicas: int, gpus: float, autoscaling: dict[str, Any] | None, echo: Callable[[str], None]) -> None:
    """``massmerge serve --ray``: join (or start) a Ray cluster, deploy, serve until SIGTERM/SIGINT, then delete
    the application (Ray drains its replicas within ``--grace-s``)."""
    import ray

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(artifact, limits, api_key=api_key, overrides=overrides, router=router, strategy=strategy,
                          device=device, replicas=replicas, gpus=gpus, autoscaling=autoscaling),
              name=APP_NAME, route_prefix="/")
    echo(f"massmerge serve: {artifact} on http://{host}:{port} (Ray Serve, "
         f"{'autoscaling' if autoscaling else f'{replicas} replica(s)'}, {gpus:g} GPU each; auth "
         f"{'on' if api_key else 'off'}); docs at http://{host}:{port}/docs")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    echo("massmerge serve: stopping the Ray Serve application")
    serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()


__all__ = ["APP_NAME", "MassDeployment", "MassReplica", "app_builder", "application", "run_ray"]
