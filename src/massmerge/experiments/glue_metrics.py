"""Scores of generated GLUE answers by FusionBench's rules: exact match, and Spearman over the whole STS-B split.

Why these rules exactly: the anchors' figures were computed with them (tanganke/fusion_bench
``fusion_bench/tasks/flan_t5_text_generation/glue_evaluation.py``). A classification answer counts only when the
decoded output equals the decoded target string. For STS-B every output and target is parsed with ``float``;
an output that does not parse counts as 0.0; Spearman's rho (average ranks for ties, as ``scipy.stats.spearmanr``)
is taken once over the whole split, not per batch.

When rho is undefined (every parsed output equal, for instance none parses, or a NaN among them) FusionBench
reports NaN; here the score is ``None`` with the reason, so the report says so instead of writing NaN.
Pure functions on strings and numbers: no model, no tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from massmerge.data.glue import REGRESSION_TASKS


@dataclass(frozen=True)
class TaskScore:
    """One task's score: ``value`` (None when undefined), the metric's name, the count and why it is undefined."""

    metric: str
    value: float | None
    count: int
    note: str | None = None
    parsed: int | None = None  # STS-B: outputs that parsed as a number

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"metric": self.metric, "value": self.value, "count": self.count}
        if self.note is not None:
            out["note"] = self.note
        if self.parsed is not None:
            out["parsed"] = self.parsed
        return out


def exact_match(outputs: Sequence[str], targets: Sequence[str]) -> TaskScore:
    """Fraction of outputs equal to their target string (the strings as decoded, nothing stripped)."""
    _same_length(outputs, targets)
    if not targets:
        return TaskScore("accuracy", None, 0, "empty split")
    correct = sum(1 for out, target in zip(outputs, targets, strict=True) if out == target)
    return TaskScore("accuracy", correct / len(targets), len(targets))


def parse_score(text: str) -> float:
    """``float(text)``, or 0.0 when it does not parse (FusionBench's rule for STS-B outputs)."""
    try:
        return float(text)
    except (TypeError, ValueError, OverflowError):
        return 0.0


def parses(text: str) -> bool:
    """Whether ``text`` is a number ``float`` reads."""
    try:
        float(text)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties given their average rank (``scipy.stats.rankdata(method='average')``)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    out = np.empty(len(x), dtype=np.float64)
    start = 0
    while start < len(x):
        stop = start + 1
        while stop < len(x) and sorted_x[stop] == sorted_x[start]:
            stop += 1
        out[order[start:stop]] = (start + stop + 1) / 2.0  # mean of the ranks start+1 .. stop
        start = stop
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, str | None]:
    """Spearman's rho of two equal-length sequences, or (None, why) when it is undefined."""
    _same_length(x, y)
    if len(x) < 2:
        return None, f"Spearman needs at least 2 items, got {len(x)}"
    if any(math.isnan(v) for v in (*x, *y)):
        return None, "Spearman is undefined: a NaN among the values"
    rx, ry = ranks(x), ranks(y)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    if not dx.any():
        return None, "Spearman is undefined: the outputs are constant (every one parses to the same number)"
    if not dy.any():
        return None, "Spearman is undefined: the targets are constant"
    rho = float((dx * dy).sum() / math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum())))
    return max(-1.0, min(1.0, rho)), None


def spearman_score(outputs: Sequence[str], targets: Sequence[str]) -> TaskScore:
    """STS-B: Spearman over the whole split of the parsed outputs against the parsed targets."""
    _same_length(outputs, targets)
    parsed = sum(1 for out in outputs if parses(out))
    rho, note = spearman([parse_score(o) for o in outputs], [parse_score(t) for t in targets])
    if rho is None and parsed == 0 and outputs:
        note = "Spearman is undefined: no output parses as a number (each counts as 0.0, a constant)"
    return TaskScore("spearman", rho, len(targets), note, parsed)


def score_task(task: str, outputs: Sequence[str], targets: Sequence[str]) -> TaskScore:
    """The task's own metric: Spearman for STS-B, exact match for the rest."""
    return spearman_score(outputs, targets) if task in REGRESSION_TASKS else exact_match(outputs, targets)


def _same_length(a: Sequence[object], b: Sequence[object]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} outputs for {len(b)} targets")


__all__ = ["TaskScore", "exact_match", "parse_score", "parses", "ranks", "score_task", "spearman", "spearman_score"]
