"""Dynamic batching for the server: requests from many clients wait in one bounded queue and are answered
together, in one :meth:`Predictor.stream` call per batch, on one worker thread.

Why our own queue (docs/SERVING.md): FastAPI and uvicorn do not batch, and the PyPI batchers we checked
(``batched``, ``fast-dynamic-batcher``, ``aiobatch``) batch items of one kind with one function: none groups
requests by a key (two requests with different router settings cannot share a forward), none counts a request of
16 inputs as 16, and none refuses work when full (they queue without bound). This is one asyncio queue, about
a hundred lines: bounded (full -> :class:`QueueFull`, the server answers 503), a batch closes at
``max_batch_size`` inputs or ``max_wait_ms`` after its first request, and its requests' inputs run as one
window, so mixed-task inputs group by task set exactly as ``massmerge predict`` groups them.

The model runs on one thread (never on the event loop); a request that fails to prepare (an input the model
cannot read) fails alone, the others of its batch are answered.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from massmerge.errors import MassMergeError


class QueueFull(MassMergeError):
    """The queue holds ``max_queue`` inputs already: the caller should retry later (HTTP 503)."""


class Draining(MassMergeError):
    """The server is shutting down and takes no new work (HTTP 503)."""


@dataclass
class Pending:
    """One request in the queue: its inputs (decoded, not yet prepared), its settings and its answer."""

    inputs: Sequence[Any]
    settings: dict[str, Any]
    future: asyncio.Future[list[dict[str, Any]]]
    key: Hashable = field(init=False)

    def __post_init__(self) -> None:
        self.key = tuple(sorted(self.settings.items()))


@dataclass(frozen=True)
class BatchReport:
    """What one batch did, for the metrics: its requests and inputs, seconds on the model, and the task set
    of every answered input."""

    requests: int
    inputs: int
    seconds: float
    task_sets: list[tuple[str, ...]]


RunBatch = Callable[[list[Pending]], BatchReport]


class DynamicBatcher:
    """A bounded queue of requests and one task that forms batches and runs them on a worker thread.

    ``run(batch)`` runs on the worker thread and sets every request's future (through the loop); ``on_batch``
    sees each :class:`BatchReport`; ``on_depth`` sees the queued input count whenever it changes.
    """

    def __init__(self, run: RunBatch, *, max_batch_size: int, max_wait_ms: float, max_queue: int,
                 on_batch: Callable[[BatchReport], None] = lambda report: None,
                 on_depth: Callable[[int], None] = lambda depth: None) -> None:
        self._run, self._on_batch, self._on_depth = run, on_batch, on_depth
        self.max_batch_size, self.max_wait, self.max_queue = max_batch_size, max_wait_ms / 1000.0, max_queue
        self._queue: deque[Pending] = deque()
        self._queued_inputs = 0
        self._running = 0  # inputs in the batch on the worker thread
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="massmerge-model")
        self.draining = False

    # -- life cycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start forming batches (on the running event loop)."""
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="massmerge-batcher")

    async def stop(self) -> None:
        """Answer what is queued, then stop the batching task and the worker thread."""
        self.draining = True
        while self._queue or self._running:
            assert self._wakeup is not None
            self._wakeup.set()
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    @property
    def busy(self) -> int:
        """Inputs queued or running."""
        return self._queued_inputs + self._running

    # -- requests -------------------------------------------------------------------------------------------
    async def submit(self, inputs: Sequence[Any], settings: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
        """The rows for ``inputs`` under ``settings``; :class:`QueueFull` when there is no room,
        :class:`Draining` during shutdown, :class:`TimeoutError` after ``timeout`` seconds (a queued request is
        then dropped; a running one finishes, unanswered)."""
        if self.draining:
            raise Draining("the server is shutting down; retry on another replica")
        if self._queued_inputs + len(inputs) > self.max_queue:
            raise QueueFull(f"the queue is full ({self._queued_inputs} of {self.max_queue} inputs waiting); retry "
                            "later")
        pending = Pending(inputs, settings, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._set_depth(len(inputs))
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout)
        except (TimeoutError, asyncio.CancelledError):
            if pending in self._queue:  # never started: drop it so it costs nothing
                self._queue.remove(pending)
                self._set_depth(-len(inputs))
            pending.future.cancel()
            raise

    async def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the model's worker thread, after the batch running there: model work that does not batch
        (generation), serialized with the batches so one thread ever touches the model."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _set_depth(self, change: int) -> None:
        self._queued_inputs += change
        self._on_depth(self._queued_inputs)

    # -- batching -------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = time.monotonic() + self.max_wait
            while not self.draining and self._fill() < self.max_batch_size and time.monotonic() < deadline:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            self._running = sum(len(p.inputs) for p in batch)
            try:
                report = await loop.run_in_executor(self._executor, self._run, batch)
                self._on_batch(report)
            except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, never the server
                for pending in batch:
                    _settle(pending, exc)
            finally:
                self._running = 0

    def _fill(self) -> int:
        """Inputs the next batch would hold: the first request's settings, up to ``max_batch_size``."""
        return sum(len(p.inputs) for p in self._batchable())

    def _batchable(self) -> list[Pending]:
        """The queued requests that share the oldest request's settings, oldest first, up to ``max_batch_size``
        inputs (always at least the oldest, however large)."""
        if not self._queue:
            return []
        key, chosen, size = self._queue[0].key, [], 0
        for pending in self._queue:
            if pending.key != key:
                continue
            if chosen and size + len(pending.inputs) > self.max_batch_size:
                break
            chosen.append(pending)
            size += len(pending.inputs)
        return chosen

    def _take(self) -> list[Pending]:
        chosen = [p for p in self._batchable() if not p.future.cancelled()]
        for pending in self._batchable():
            self._queue.remove(pending)
            self._set_depth(-len(pending.inputs))
        return chosen


def _settle(pending: Pending, outcome: list[dict[str, Any]] | BaseException) -> None:
    """Answer one request (on the event loop's thread): its rows or its error; a timed-out one is left alone."""
    future = pending.future
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def settle_threadsafe(pending: Pending, outcome: list[dict[str, Any]] | BaseException) -> None:
    """:func:`_settle` from the worker thread."""
    pending.future.get_loop().call_soon_threadsafe(_settle, pending, outcome)


__all__ = ["BatchReport", "Draining", "DynamicBatcher", "Pending", "QueueFull", "settle_threadsafe"]
