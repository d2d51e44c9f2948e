"""Progress bars for long loops, shown by the CLI and silent in library use unless asked for.

Why a switch: library callers (tests, notebooks, servers) should not get terminal output by default, while a
user running ``massmerge merge`` on a 20-expert ViT-L wants to see it move.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

_enabled = False


def set_enabled(enabled: bool) -> None:
    """Turn progress bars on (the CLI does) or off (the default for library use)."""
    global _enabled
    _enabled = enabled


def is_enabled() -> bool:
    return _enabled


def make_progress() -> Progress:
    """A rich Progress with the columns every massmerge bar uses (writes to stderr)."""
    from rich.console import Console

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items``, drawing a bar when progress is enabled."""
    if not _enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress() as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
