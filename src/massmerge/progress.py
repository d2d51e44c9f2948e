"""Progress for long loops: shown by the CLI on stderr, silent in library use unless asked for.

Why a switch: library callers (tests, notebooks, servers) should not get terminal output by default, while a
user running ``massmerge build`` on 20 experts wants to see it move. On a terminal a rich bar is drawn; when
stderr is a file or a pipe (a log, CI), a plain line is written when a stage starts, then about every
``LOG_EVERY_SECONDS`` with the step, elapsed time and an ETA, and when it ends, so a long run that is logged
still shows its stage, step and ETA (a bar would be invisible there). Stages shorter than
``FIRST_LINE_AFTER_SECONDS`` print nothing, so a command that fails fast still prints one error line only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
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


def is_enabled() -> bool:
    return _enabled


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


def _logged(items: Iterable[T], description: str, total: int | None, stream: TextIO) -> Iterator[T]:
    start = time.perf_counter()
    next_line = start + FIRST_LINE_AFTER_SECONDS
    printed = False
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now >= next_line and done != total:
            _log_line(stream, description, done, total, start)
            printed, next_line = True, now + LOG_EVERY_SECONDS
    if printed or time.perf_counter() - start >= FIRST_LINE_AFTER_SECONDS:
        _log_line(stream, description, done, total, start)


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


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with progress when enabled: a bar on a terminal, log lines otherwise."""
    if not _enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        yield from _bar(items, description, total)
    else:
        yield from _logged(items, description, total, sys.stderr)


@contextmanager
def quiet_third_party() -> Iterator[None]:
    """Silence transformers' and huggingface_hub's own progress bars and info logs for the block (e.g. the
    "Loading weights" bar), so our stderr holds our progress and, on failure, one error line."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
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
