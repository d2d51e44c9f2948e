"""The stage clock: wall seconds per stage of the served path, for benchmarks (``MASSModel.timed``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageClock:
    """Wall seconds of each stage of the served path, each stage's own time (a stage inside another is taken out
    of the outer one): ``first pass + router``, ``set merges`` (a new task set's cores and values) and
    ``second pass + heads``. For one caller at a time (a benchmark), through :meth:`MASSModel.timed`."""

    STAGES = ("first pass + router", "set merges", "second pass + heads")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self._inner: list[float] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.seconds[name] += spent - self._inner.pop()
            if self._inner:
                self._inner[-1] += spent


__all__ = ["StageClock"]
