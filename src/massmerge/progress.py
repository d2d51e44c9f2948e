"""Progress for long loops: shown by the CLI on stderr, silent in library use unless asked for.

Why a switch: library callers (tests, notebooks, servers) should not get terminal output by default, while a
user running ``massmerge build`` on 20 experts wants to see it move. On a terminal a rich bar is drawn; when
stderr is a file or a pipe (a log, CI), plain lines are written instead: the first once a stage has run
``FIRST_LINE_AFTER_SECONDS``, then about every ``LOG_EVERY_SECONDS`` (from a timer, so a single slow step
still shows up) with the stage, step, elapsed time and an ETA, and one when it ends; a long run that is logged
still shows where it is (a bar would be invisible there). Stages shorter than ``FIRST_LINE_AFTER_SECONDS``
print nothing, so a command that fails fast still prints one error line only.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TextIO, TypeVar

T = TypeVar("T")

LOG_EVERY_SECONDS = 30.0
FIRST_LINE_AFTER_SECONDS = 2.0

_enabled = False


def set_enabled(enabled: bool) -> None:
    """Turn progress on (the CLI does) or off (the default for library use)."""
    global _enabled
    _enabled = enabled


def clock(seconds: float) -> str:
    """``3725`` -> ``'1:02:05'``."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _log_line(stream: TextIO, description: str, done: int, total: int | None, start: float) -> None:
    elapsed = time.perf_counter() - start
    if total:
        eta = elapsed / done * (total - done) if done else float("nan")
        eta_text = clock(eta) if done else "?"
        stream.write(f"{description}: {done}/{total} ({100 * done / total:.0f}%), elapsed {clock(elapsed)}, "
                     f"eta {eta_text}\n")
    else:
        stream.write(f"{description}: {done} done, elapsed {clock(elapsed)}\n")
    stream.flush()


class _StageLog:
    """Plain progress lines of one stage for a log file: the first after ``FIRST_LINE_AFTER_SECONDS``, then
    about every ``LOG_EVERY_SECONDS``, from a timer thread as well as after each step, so one slow step (an
    expert factorized for 10 minutes) still shows the stage is alive; a last line when the stage ends."""

    def __init__(self, description: str, total: int | None, stream: TextIO) -> None:
        self.description, self.total, self.stream = description, total, stream
        self.start = time.perf_counter()
        self.done = 0
        self.printed = False
        self.next_line = self.start + FIRST_LINE_AFTER_SECONDS
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._heartbeat, daemon=True)
        self.thread.start()

    def _heartbeat(self) -> None:
        while not self.stop.wait(timeout=max(0.05, self.next_line - time.perf_counter())):
            self.maybe_write()

    def maybe_write(self) -> None:
        with self.lock:
            now = time.perf_counter()
            if now >= self.next_line and self.done != self.total and not self.stop.is_set():
                _log_line(self.stream, self.description, self.done, self.total, self.start)
                self.printed, self.next_line = True, now + LOG_EVERY_SECONDS

    def step(self) -> None:
        with self.lock:
            self.done += 1
        self.maybe_write()

    def close(self, *, finished: bool) -> None:
        """Stop the timer; a finished stage gets its last line when any line was written or it took long
        enough (a failed one gets none, so the error line comes right after the progress)."""
        self.stop.set()
        self.thread.join()
        if finished and (self.printed or time.perf_counter() - self.start >= FIRST_LINE_AFTER_SECONDS):
            _log_line(self.stream, self.description, self.done, self.total, self.start)


def _logged(items: Iterable[T], description: str, total: int | None, stream: TextIO) -> Iterator[T]:
    log = _StageLog(description, total, stream)
    finished = False
    try:
        for item in items:
            yield item
            log.step()
        finished = True
    finally:
        log.close(finished=finished)


def _bar(items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


Listener = Callable[[str, int, int | None], None]  # (stage description, items done, total or None)
_listeners: list[Listener] = []


@contextmanager
def listen(listener: Listener) -> Iterator[None]:
    """Call ``listener(description, done, total)`` at the start of every tracked stage (``done`` 0) and after each
    of its items, for the block, whether progress is shown or not. Why: a benchmark or a service can observe a
    long stage (memory after each expert of a build, say) through the public path instead of patching it."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def _heard(items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    listeners = list(_listeners)
    for listener in listeners:
        listener(description, 0, total)
    for done, item in enumerate(items, start=1):
        yield item
        for listener in listeners:
            listener(description, done, total)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with progress when enabled: a bar on a terminal, log lines otherwise (and the
    :func:`listen` callbacks, when any)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if _listeners:
        items = _heard(items, description, total)
    if not _enabled:
        yield from items
        return
    if sys.stderr.isatty():
        yield from _bar(items, description, total)
    else:
        yield from _logged(items, description, total, sys.stderr)


# transformers' and huggingface_hub's own switches, read when they are imported
QUIET_ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@contextmanager
def quiet_third_party() -> Iterator[None]:
    """Silence transformers' and huggingface_hub's own progress bars and info logs for the block (e.g. the
    "Loading weights" bar), so our stderr holds our progress and, on failure, one error line.

    Not yet imported (every CLI command starts so), they are not imported for this: their environment switches
    are set for the block instead (the user's own settings win), and a command that imports them reads them.
    Why: importing transformers only to silence it cost 0.9 s of every command, ``massmerge --help`` included
    (issue 13: the CLI starts in under 1 s). Already imported (library use), their settings are switched and
    restored.
    """
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is None:
        added = {key: value for key, value in QUIET_ENVIRONMENT.items() if key not in os.environ}
        os.environ.update(added)
        try:
            yield
        finally:
            for key in added:
                os.environ.pop(key, None)
        return
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
