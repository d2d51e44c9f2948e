"""The HTTP API of ``massmerge serve``: a FastAPI app around one loaded :class:`Predictor` and a
:class:`~massmerge.server.batcher.DynamicBatcher`.

Endpoints: ``POST /v1/predict`` (classifying artifacts), ``POST /v1/generate`` (generating artifacts; streamed
as server-sent events on request), ``GET /healthz``
(the process is up), ``GET /readyz`` (takes requests; 503 while draining), ``GET /metrics`` (Prometheus),
``/openapi.json`` and ``/docs``. Every error body is ``{"error": "<one line naming the field>"}``; no error
of one request touches another or the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException

from massmerge import __version__
from massmerge.artifact.predictor import Predictor, image_from_bytes
from massmerge.errors import MassMergeError, OptionError
from massmerge.mass.config import GenerateSettings, make_generate_settings
from massmerge.server.batcher import BatchReport, Draining, DynamicBatcher, Pending, QueueFull, settle_threadsafe
from massmerge.server.limits import ServerLimits, flag
from massmerge.server.metrics import Metrics
from massmerge.server.schema import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    PredictRequest,
    PredictResponse,
    RequestError,
    check_texts,
    image_bytes,
    option_line,
    parse_generate,
    parse_predict,
    set_fields,
    settings_of,
)

log = logging.getLogger("massmerge.server")
RETRY_AFTER_S = 1  # what a 503 asks a client to wait before retrying
ENDPOINTS = ("/v1/predict", "/v1/generate", "/healthz", "/readyz", "/metrics")
Scope = MutableMapping[str, Any]
Submit = Callable[[list[Any], dict[str, Any], float], Awaitable[list[dict[str, Any]]]]
ASGI = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


@dataclass
class ServerState:
    """What the process knows about itself: requests in flight and whether it is draining (shutting down)."""

    in_flight: int = 0
    draining: bool = False
    started: bool = False

    @property
    def idle(self) -> bool:
        return self.in_flight == 0


def answer(predictor: Predictor, requests: list[tuple[list[Any], dict[str, Any]]]) -> list[list[dict[str, Any]] | Exception]:
    """Rows (or the error) for each ``(inputs, settings)`` request: one model window per settings group, each
    request prepared on its own (a request the model cannot read fails alone). For callers that batch their own
    way (Ray Serve's ``@serve.batch``)."""
    out: list[list[dict[str, Any]] | Exception] = [RuntimeError("unanswered")] * len(requests)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (_, settings) in enumerate(requests):
        groups.setdefault(tuple(sorted(settings.items())), []).append(i)
    for members in groups.values():
        prepared: list[Any] = []
        owners: list[tuple[int, int, int]] = []
        for i in members:
            inputs = requests[i][0]
            try:
                items = _prepare(predictor, inputs)
            except RequestError as exc:
                out[i] = exc
                continue
            owners.append((i, len(prepared), len(items)))
            prepared.extend(items)
        rows = _rows(predictor, prepared, requests[members[0]][1])
        for i, first, count in owners:
            out[i] = rows[first:first + count]
    return out


def _prepare(predictor: Predictor, inputs: Sequence[Any]) -> list[Any]:
    try:
        return predictor.prepare(inputs, [f"inputs[{i}]" for i in range(len(inputs))])
    except MassMergeError as exc:
        raise RequestError(422, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer refusing a lone surrogate: this request only
        raise RequestError(422, f"inputs: cannot be read by the model ({exc})") from None


def _rows(predictor: Predictor, prepared: list[Any], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """predict's rows, without ``index``, for prepared inputs routed as one window."""
    rows = [row for _, row in predictor.stream(prepared, settings=settings, window=max(1, len(prepared)))]
    for row in rows:
        del row["index"]
    return rows


def generate_options(predictor: Predictor, request: GenerateRequest) -> tuple[dict[str, Any], GenerateSettings]:
    """A generate request's router settings and generation options, checked as ``massmerge predict`` checks
    its flags (one line naming ``settings.<field>`` or ``generation.<field>``)."""
    router = set_fields(request.settings)
    try:
        predictor.view(router)
    except MassMergeError as exc:
        raise RequestError(422, "settings." + option_line(str(exc)).removeprefix("settings.")) from None
    try:
        generation = make_generate_settings(**set_fields(request.generation))
    except OptionError as exc:
        raise RequestError(422, "generation." + option_line(str(exc))) from None
    if request.stream and generation.num_beams > 1:
        raise RequestError(422, f"generation.num_beams: streaming decodes one sequence (got {generation.num_beams});"
                                " use \"stream\": false for beam search")
    return router, generation


def generations(predictor: Predictor, prompts: list[str], generation: GenerateSettings, router: dict[str, Any],
                **hf: Any) -> list[dict[str, Any]]:
    """Predictor.generate's rows without ``index`` (on the model's worker thread)."""
    rows = predictor.generate(prompts, generation, router=router, **hf)
    for row in rows:
        del row["index"]
    return rows


def _event(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def stream_generation(predictor: Predictor, prompt: str, generation: GenerateSettings, router: dict[str, Any],
                      on_model: Callable[[Callable[[], Any]], Awaitable[Any]], timeout: float,
                      done: Callable[[], None]) -> StreamingResponse:
    """Server-sent events for one prompt: ``{"text": chunk}`` per chunk of HF's ``TextIteratorStreamer``, then
    the row (``selected``, ``probs``, ``text``) or ``{"error": line}``, then ``[DONE]``. The generate call runs
    on the model's worker thread (MASSModel.generate enters routing and task sets in that thread); the chunks
    are read off a threadpool, never blocking the event loop. ``done()`` runs when the stream ends."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(predictor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["row"] = generations(predictor, [prompt], generation, router, streamer=streamer)[0]
        except Exception as exc:  # noqa: BLE001 - told to the client as the last event
            outcome["error"] = exc
            streamer.end()

    task = asyncio.ensure_future(on_model(work))

    async def events() -> AsyncIterator[str]:
        try:
            try:
                async for chunk in iterate_in_threadpool(streamer):
                    if chunk:
                        yield _event({"text": chunk})
                await task
            except Exception:  # noqa: BLE001 - the streamer's queue.Empty: no token within the timeout
                outcome.setdefault("error", TimeoutError())
            error = outcome.get("error")
            if error is None:
                yield _event(outcome["row"])
            else:
                yield _event({"error": _failure_line(error, timeout)})
            yield "data: [DONE]\n\n"
        finally:
            done()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _failure_line(error: BaseException, timeout: float) -> str:
    if isinstance(error, TimeoutError):
        return f"request: not answered within {flag('request_timeout_s')} {timeout:g}"
    if isinstance(error, MassMergeError):
        return " ".join(str(error).split())
    log.error("massmerge serve: streamed generation failed", exc_info=error)
    return f"internal error ({type(error).__name__}); the server logged it"


def run_batch(predictor: Predictor, batch: list[Pending]) -> BatchReport:
    """One model call for a batch of requests that share settings (on the worker thread): each request's
    inputs are prepared on their own (a request the model cannot read fails alone), then all are answered in
    one window, so they group by task set exactly as one ``massmerge predict`` call groups them."""
    start = time.perf_counter()
    prepared: list[Any] = []
    owners: list[tuple[Pending, int, int]] = []
    for pending in batch:
        try:
            items = _prepare(predictor, pending.inputs)
        except RequestError as exc:
            settle_threadsafe(pending, exc)
            continue
        owners.append((pending, len(prepared), len(items)))
        prepared.extend(items)
    rows = _rows(predictor, prepared, batch[0].settings)
    for pending, first, count in owners:
        settle_threadsafe(pending, rows[first:first + count])
    return BatchReport(requests=len(owners), inputs=len(rows), seconds=time.perf_counter() - start,
                       task_sets=[tuple(row["selected"]) for row in rows])


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)


class Guard:
    """Pure ASGI middleware: the body-size limit (413 from Content-Length, or as the body streams in), and the
    request count and latency per endpoint for the metrics."""

    def __init__(self, app: ASGI, *, max_body_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        started, status = time.perf_counter(), [500]

        async def observed(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        length = dict(scope["headers"]).get(b"content-length")
        try:
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                await self._too_large(int(length))(scope, receive, observed)
            else:
                await self.app(scope, self._limited(receive), observed)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, code=str(status[0])).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)

    def _too_large(self, size: int) -> JSONResponse:
        return _error(413, f"body: {size} bytes, more than {flag('max_body_bytes')} {self.max_body_bytes}")

    def _limited(self, receive: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        received = 0

        async def limited() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, f"body: more than {flag('max_body_bytes')} {self.max_body_bytes} bytes")
            return message

        return limited


def create_app(predictor: Predictor, limits: ServerLimits, *, api_key: str | None = None,
               state: ServerState | None = None, metrics: Metrics | None = None,
               submit: Submit | None = None) -> FastAPI:
    """The app serving ``predictor`` (already loaded: the app never loads a model) under ``limits``.

    ``submit(inputs, settings, timeout) -> rows`` answers validated requests; by default a
    :class:`DynamicBatcher` of this process (Ray Serve passes its own ``@serve.batch`` method)."""
    state = state or ServerState()
    metrics = metrics or Metrics()
    batcher = None
    if submit is None:
        batcher = DynamicBatcher(lambda batch: run_batch(predictor, batch), max_batch_size=limits.max_batch_size,
                                 max_wait_ms=limits.max_wait_ms, max_queue=limits.max_queue,
                                 on_batch=metrics.observe_batch, on_depth=metrics.queue.set)
        submit = batcher.submit
    else:
        state.started = True  # the host (Ray Serve) owns the life cycle

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        if batcher is not None:
            batcher.start()
        state.started = True
        metrics.ready.set(1)
        yield
        state.draining = True
        metrics.ready.set(0)
        if batcher is not None:
            await batcher.stop()

    app = FastAPI(title="massmerge serve", version=__version__, lifespan=lifespan,
                  description=f"One MASS model for every task of {predictor.artifact.name}: "
                              f"{', '.join(predictor.task_names)}. No task label on the request: the router "
                              "chooses.")
    app.state.server, app.state.batcher, app.state.metrics = state, batcher, metrics
    app.add_middleware(Guard, max_body_bytes=limits.max_body_bytes, metrics=metrics)
    _errors(app, limits)
    auth = _auth(api_key)
    responses: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in
                                                  (400, 401, 413, 422, 503, 504)}

    @app.post("/v1/predict", response_model=PredictResponse, responses=responses, dependencies=[Depends(auth)],
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": PredictRequest.model_json_schema()}}}})
    async def predict(request: Request) -> Response:
        """Classify inputs of any of the artifact's tasks, mixed freely: one prediction per input, in order."""
        if state.draining:
            raise Draining("the server is shutting down; retry on another replica")
        state.in_flight += 1
        try:
            if predictor.output == "generate":
                raise RequestError(501, f"/v1/predict: {predictor.artifact.name} generates text; use /v1/generate")
            parsed = parse_predict(await request.body(), limits)
            settings = settings_of(parsed)
            try:
                predictor.view(settings)  # checked as `massmerge predict` checks its flags
            except MassMergeError as exc:
                raise RequestError(422, option_line(str(exc))) from None
            inputs = await _decode(predictor, parsed.inputs, limits)
            rows = await submit(inputs, settings, limits.request_timeout_s)
            return JSONResponse({"predictions": rows})
        finally:
            state.in_flight -= 1

    async def on_model(fn: Callable[[], Any]) -> Any:
        """``fn()`` on the model's worker thread (the batcher's; Ray Serve: a threadpool thread)."""
        return await (batcher.call(fn) if batcher is not None else run_in_threadpool(fn))

    @app.post("/v1/generate", response_model=GenerateResponse, dependencies=[Depends(auth)],
              responses={**responses, 501: {"model": ErrorResponse}},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": GenerateRequest.model_json_schema()}}}})
    async def generate(request: Request) -> Response:
        """Generate text for each prompt (generative artifacts): one generation per input, in order; with
        ``"stream": true`` and one input, server-sent events, one per text chunk, then the row, then [DONE]."""
        if predictor.output != "generate":
            return _error(501, f"/v1/generate: {predictor.artifact.name} is a classifier ({predictor.kind} family "
                               f"'{predictor.manifest.architecture.adapter}'); use /v1/predict")
        if state.draining:
            raise Draining("the server is shutting down; retry on another replica")
        state.in_flight += 1
        handed_off = False
        try:
            parsed = parse_generate(await request.body(), limits)
            router, generation = generate_options(predictor, parsed)
            prompts = check_texts(parsed.inputs, limits)
            if parsed.stream:
                response = stream_generation(predictor, prompts[0], generation, router, on_model,
                                             limits.request_timeout_s, done=lambda: _leave(state))
                handed_off = True
                return response
            rows = await asyncio.wait_for(on_model(lambda: generations(predictor, prompts, generation, router)),
                                          limits.request_timeout_s)
            return JSONResponse({"generations": rows})
        finally:
            if not handed_off:
                state.in_flight -= 1

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> dict[str, str]:
        """The process is up (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def readyz() -> Response:
        """The server takes new requests (readiness); 503 while it drains for shutdown."""
        if state.draining or not state.started:
            return JSONResponse({"status": "draining" if state.draining else "loading"}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", dependencies=[Depends(auth)], response_class=Response)
    async def metrics_endpoint() -> Response:
        """Prometheus metrics: requests, inputs, batch sizes, queue depth, latency, routed task sets."""
        return Response(metrics.exposition(), media_type=metrics.content_type)

    return app


def _leave(state: ServerState) -> None:
    state.in_flight -= 1


async def _decode(predictor: Predictor, inputs: list[str], limits: ServerLimits) -> list[Any]:
    """Texts checked for length; images decoded here (off the event loop), so an undecodable one is named
    before it can reach a batch."""
    if predictor.kind == "text":
        return check_texts(inputs, limits)
    encoded = image_bytes(inputs)
    return await run_in_threadpool(_images, encoded)


def _images(encoded: list[bytes]) -> list[Any]:
    from PIL import Image

    out = []
    for i, data in enumerate(encoded):
        try:
            out.append(image_from_bytes(data, f"inputs[{i}]"))
        except MassMergeError as exc:
            raise RequestError(422, str(exc)) from None
        except Image.DecompressionBombError:
            raise RequestError(422, f"inputs[{i}]: image has more than {Image.MAX_IMAGE_PIXELS} pixels") from None
    return out


def _auth(api_key: str | None) -> Callable[..., Awaitable[None]]:
    """A dependency requiring ``Authorization: Bearer <api_key>`` (none when there is no key)."""
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key")

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if api_key is None:
            return
        if credentials is None:
            raise HTTPException(401, "Authorization: expected 'Bearer <api key>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise HTTPException(401, "Authorization: wrong API key", headers={"WWW-Authenticate": "Bearer"})

    return check


def _errors(app: FastAPI, limits: ServerLimits) -> None:
    """Every error as ``{"error": one line}`` with its status."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"{request.url.path}: no such endpoint (see /docs)"
        elif exc.status_code == 405:
            message = f"{request.url.path}: method {request.method} not allowed"
        return _error(exc.status_code, message, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return _error(422, f"{where}: {first['msg']}")

    @app.exception_handler(QueueFull)
    @app.exception_handler(Draining)
    async def unavailable(request: Request, exc: MassMergeError) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(TimeoutError)
    async def timeout(request: Request, exc: TimeoutError) -> JSONResponse:
        return _error(504, f"request: not answered within {flag('request_timeout_s')} {limits.request_timeout_s:g}")

    @app.exception_handler(MassMergeError)
    async def user_error(request: Request, exc: MassMergeError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("massmerge serve: %s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); the server logged it")


__all__ = ["Guard", "ServerState", "Submit", "answer", "create_app", "generate_options", "generations", "run_batch",
           "stream_generation"]
