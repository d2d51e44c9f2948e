"""Task scaling (issue 22): how each method holds up as the number of merged tasks T grows.

The suite draws seeded task subsets of each size from its preset (the ``wide`` preset's 16 tasks by default:
T = 2, 4, 8, 12, 16, three subsets per T), rebuilds every method on each subset's experts alone, and reports
normalized accuracy averaged over the subset's tasks. This module holds the two pure parts: the sampler and
the summary across subsets.

Intervals across subsets: mean +- t(0.975, n - 1) * sd / sqrt(n) over the n subsets of a size, which carries
both the choice of tasks and each subset's test noise. A size with a single subset (T = all the tasks) takes
that run's own interval (per-task Wilson intervals combined, as every other average of the report).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

#: Task counts the scaling curve visits (those above the preset's size are left out).
SCALING_SIZES = (2, 4, 8, 12, 16)
#: Seeded subsets drawn per task count.
SCALING_DRAWS = 3
#: Methods the curve follows (report row names).
SCALING_METHODS = ("MASS", "tsv_m max-logit", "tsv_m", "task_arithmetic max-logit", "task_arithmetic")
#: Two-sided 95% Student t quantiles by degrees of freedom (n - 1 subsets).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
Z95 = 1.959963984540054


def task_subsets(num_tasks: int, sizes: Sequence[int] = SCALING_SIZES, draws: int = SCALING_DRAWS,
                 seed: int = 0) -> list[tuple[int, tuple[int, ...]]]:
    """(T, sorted task indices) for ``draws`` distinct seeded subsets of each size T <= ``num_tasks``.

    Each size has its own generator (seeded by ``seed`` and T), so adding a size leaves the others' subsets
    unchanged. A size with fewer than ``draws`` distinct subsets gives all it has (T = num_tasks: one).
    """
    out = []
    for size in sorted({s for s in sizes if 1 <= s <= num_tasks}):
        rng = random.Random(f"{seed}-{size}")
        wanted = min(draws, math.comb(num_tasks, size))
        found: list[tuple[int, ...]] = []
        while len(found) < wanted:
            subset = tuple(sorted(rng.sample(range(num_tasks), size)))
            if subset not in found:
                found.append(subset)
        out += [(size, subset) for subset in found]
    return out


def interval_over(values: Sequence[float], single: tuple[float, float] | None = None) -> tuple[float, float]:
    """95% interval of the mean of ``values`` across subsets (module doc); ``single``: the run's own interval,
    used when there is one value."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return single if single is not None else (mean, mean)
    half = T975.get(len(values) - 1, Z95) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


def summarize(points: Sequence[Mapping[str, Any]], methods: Sequence[str] = SCALING_METHODS) -> list[dict[str, Any]]:
    """Per (method, T): the mean normalized accuracy over subsets, its interval, and each subset's value.

    ``points``: one per subset, ``{"T", "tasks", "avg_normalized": {method: value}, "intervals": {method:
    [low, high]}}``.
    """
    out = []
    for method in methods:
        for size in sorted({int(p["T"]) for p in points}):
            found = [p for p in points if int(p["T"]) == size and method in p["avg_normalized"]]
            if not found:
                continue
            values = [float(p["avg_normalized"][method]) for p in found]
            single = tuple(found[0]["intervals"][method]) if len(found) == 1 else None
            out.append({"method": method, "T": size, "mean": statistics.fmean(values),
                        "interval": list(interval_over(values, single)), "values": values})  # type: ignore[arg-type]
    return out


__all__ = ["SCALING_DRAWS", "SCALING_METHODS", "SCALING_SIZES", "interval_over", "summarize", "task_subsets"]
