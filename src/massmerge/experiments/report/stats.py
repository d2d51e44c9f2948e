"""The report's statistics: 95% intervals on every accuracy, the targets and MASS's loss split.

Why intervals: one seed and 160-500 test items a task make a few points of difference noise. Every accuracy
carries a 95% interval and every target is called met, missed or "not distinguishable from the target" from it.

- One task's accuracy: Wilson score interval for a binomial with n = the split's item count.
- An average over tasks: mean +- z * sqrt(sum of the per-task variances) / T, each task's variance taken from
  its Wilson half-width ((high - low) / 2z, which stays positive at 0% and 100%).
- Normalized accuracy divides by the expert's measured accuracy, taken as the fixed yardstick (the target is
  "95% of the experts as measured"), so its interval is the accuracy interval over the expert's accuracy.
- A difference of two methods adds their variances. That ignores that both ran on the same test items (which
  makes the true interval narrower), so it is on the safe side.

A report may lack the rows a section reads (``massmerge evaluate --config`` runs the methods its config lists):
such a target is "not measured", and the loss split and the zero-shot flags are left empty.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from massmerge.experiments.scaling import summarize

#: Two-sided 95% normal quantile.
Z95 = 1.959963984540054
#: Design.md section 7: MASS keeps this share of the experts on average ...
AVERAGE_GOAL = 0.95
#: ... and at least this share on every task ...
TASK_GOAL = 0.85
#: ... and beats TSV-M by this many points of normalized accuracy.
TSV_M_MARGIN = 0.05

MET, MISSED, UNCLEAR, UNMEASURED = "met", "missed", "not distinguishable from the target", "not measured"

# ----- statistics ------------------------------------------------------------------------------------------------


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``p`` observed on ``n`` items ((0, 1) when n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def _se(interval: tuple[float, float], z: float = Z95) -> float:
    """Standard error implied by a 95% interval's width."""
    return (interval[1] - interval[0]) / (2 * z)


def normal_interval(value: float, se: float, z: float = Z95) -> tuple[float, float]:
    return value - z * se, value + z * se


def mean_se(ses: Sequence[float]) -> float:
    """Standard error of an unweighted mean of independent estimates."""
    return math.sqrt(sum(s * s for s in ses)) / len(ses) if ses else float("nan")


def status(interval: tuple[float, float] | None, goal: float, *, strict: bool = False) -> str:
    """met when the whole interval clears the goal, missed when it lies wholly short, else not distinguishable."""
    if interval is None:
        return UNMEASURED
    low, high = interval
    if low > goal or (low == goal and not strict):
        return MET
    if high < goal or (high == goal and strict):
        return MISSED
    return UNCLEAR


def _sizes(report: Mapping[str, Any], split: str = "test") -> dict[str, int]:
    return {t["name"]: int(t["sizes"][split]) for t in report["tasks"]}


def _tasks(report: Mapping[str, Any]) -> list[str]:
    return [t["name"] for t in report["tasks"]]


def row_intervals(report: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    """95% intervals of one method row: per task and averaged, absolute and normalized."""
    n, expert = _sizes(report), report["methods"]["experts"]["accuracy"]
    acc = {t: wilson(p, n[t]) for t, p in row["accuracy"].items()}
    norm = {t: (acc[t][0] / expert[t], acc[t][1] / expert[t]) for t in row["normalized"]}
    acc_se = mean_se([_se(i) for i in acc.values()])
    norm_se = mean_se([_se(acc[t]) / expert[t] for t in norm])
    low, high = normal_interval(row["avg_accuracy"], acc_se)
    return {"accuracy": acc, "normalized": norm, "avg_accuracy": (max(0.0, low), min(1.0, high)),
            "avg_normalized": normal_interval(row["avg_normalized"], norm_se)}  # fmt: skip


def _avg_normalized_se(report: Mapping[str, Any], name: str) -> float:
    interval = row_intervals(report, report["methods"][name])["avg_normalized"]
    return _se(interval)


# ----- targets ---------------------------------------------------------------------------------------------------


def _target(description: str, unit: str, value: float | None, interval: tuple[float, float] | None, goal: float,
            *, strict: bool = False, detail: str = "", verdict: str | None = None) -> dict[str, Any]:  # fmt: skip
    """One target entry; ``verdict`` overrides the call made from ``interval`` alone."""
    return {"description": description, "unit": unit, "value": value, "interval": interval, "goal": goal,
            "status": verdict or status(interval, goal, strict=strict), "detail": detail}  # fmt: skip


def _difference(report: Mapping[str, Any], a: str, b: str, description: str, goal: float, *,
                strict: bool = False) -> dict[str, Any]:  # fmt: skip
    """Target on ``a``'s average normalized accuracy minus ``b``'s (not measured when either row is absent)."""
    methods = report["methods"]
    if a not in methods or b not in methods:
        missing = ", ".join(f"`{m}`" for m in (a, b) if m not in methods)
        return _target(description, "normalized difference", None, None, goal, detail=f"no {missing} row")
    value = methods[a]["avg_normalized"] - methods[b]["avg_normalized"]
    se = math.hypot(_avg_normalized_se(report, a), _avg_normalized_se(report, b))
    return _target(description, "normalized difference", value, normal_interval(value, se), goal, strict=strict)


def _every_task(report: Mapping[str, Any]) -> dict[str, Any]:
    """MASS's worst task against the per-task goal; the call looks at every task's interval."""
    row = report["methods"]["MASS"]
    bounds = row_intervals(report, row)["normalized"]
    worst = min(row["normalized"], key=row["normalized"].get)
    below = [t for t, (_, high) in bounds.items() if high < TASK_GOAL]
    unclear = [t for t, (low, high) in bounds.items() if low < TASK_GOAL <= high]
    verdict = MISSED if below else UNCLEAR if unclear else MET
    detail = f"worst task {worst}" + (f"; below {100 * TASK_GOAL:.0f}%: {', '.join(below)}" if below else "") + (
        f"; within noise of {100 * TASK_GOAL:.0f}%: {', '.join(unclear)}" if unclear else "")  # fmt: skip
    return _target(f"MASS (task hidden) keeps at least {100 * TASK_GOAL:.0f}% of its expert's accuracy on every "
                   "task", "normalized", row["normalized"][worst], bounds[worst], TASK_GOAL, detail=detail,
                   verdict=verdict)  # fmt: skip


def targets(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The figures we are held to (design.md section 7), each with its 95% interval and verdict.

    Needs ``report["tasks"]`` (for the test sizes) and ``report["methods"]``; rows a run skipped give
    "not measured" instead of a made-up number.
    """
    pts = f"{100 * TSV_M_MARGIN:.0f} points of normalized accuracy"
    average = f"MASS (task hidden) keeps at least {100 * AVERAGE_GOAL:.0f}% of the experts' accuracy on average"
    if "MASS" in report["methods"]:
        mass = report["methods"]["MASS"]
        mass_se = _avg_normalized_se(report, "MASS")
        mass_average = _target(average, "normalized", mass["avg_normalized"],
                               normal_interval(mass["avg_normalized"], mass_se), AVERAGE_GOAL)
        every_task = _every_task(report)
    else:
        mass_average = _target(average, "normalized", None, None, AVERAGE_GOAL, detail="no `MASS` row")
        every_task = _target(f"MASS (task hidden) keeps at least {100 * TASK_GOAL:.0f}% of its expert's accuracy on "
                             "every task", "normalized", None, None, TASK_GOAL, detail="no `MASS` row")
    return {
        "mass_average": mass_average,
        "mass_every_task": every_task,
        "mass_vs_tsv_m_max_logit": _difference(
            report, "MASS", "tsv_m max-logit",
            f"MASS (task hidden) is at least {pts} above TSV-M with max-logit heads (task hidden too)", TSV_M_MARGIN),
        "mass_vs_tsv_m_oracle": _difference(
            report, "MASS", "tsv_m",
            f"MASS (task hidden) is at least {pts} above TSV-M given the task (oracle head)", TSV_M_MARGIN),
        "tsv_m_vs_task_arithmetic_oracle": _difference(
            report, "tsv_m", "task_arithmetic", "TSV-M is above Task Arithmetic, both given the task (oracle head)",
            0.0, strict=True),
        "tsv_m_vs_task_arithmetic_max_logit": _difference(
            report, "tsv_m max-logit", "task_arithmetic max-logit",
            "TSV-M is above Task Arithmetic, both with the task hidden (max-logit heads)", 0.0, strict=True),
    }  # fmt: skip


# ----- derived sections ------------------------------------------------------------------------------------------


def _estimate(value: float, n: int) -> dict[str, Any]:
    return {"value": value, "interval": wilson(value, n), "n": n}


def mass_loss(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task, MASS's task-hidden accuracy split into its stages, and where the lost items went.

    1 = not selected + (selected - task right) + (task right - class right) + accuracy, because the final task
    is always one of the selected ones.
    """
    mass, n = report.get("mass"), _sizes(report)
    out: dict[str, dict[str, Any]] = {}
    if mass is None:
        return out
    for t in _tasks(report):
        selected, choice = mass["selection_recall"][t], mass["task_choice"][t]
        acc = report["methods"]["MASS"]["accuracy"][t]
        out[t] = {
            "routing_top1": _estimate(mass["routing_accuracy"][t], n[t]),
            "true_task_selected": _estimate(selected, n[t]),
            "task_choice": _estimate(choice, n[t]),
            "class_given_task": _estimate(mass["class_given_task"][t], round(choice * n[t])),
            "task_hidden": _estimate(acc, n[t]),
            "lost": {"not_selected": 1 - selected, "wrong_final_task": max(0.0, selected - choice),
                     "wrong_class": max(0.0, choice - acc)},
        }  # fmt: skip
    return out


def below_zero_shot(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Tasks where MASS (task hidden) scores below zero-shot max-logit (the same strict scoring)."""
    methods, n = report["methods"], _sizes(report)
    out: list[dict[str, Any]] = []
    if any(k not in methods for k in ("MASS", "zero-shot max-logit", "zero-shot")):
        return out
    mass, zero, oracle = (methods[k]["accuracy"] for k in ("MASS", "zero-shot max-logit", "zero-shot"))
    for t in _tasks(report):
        if mass[t] >= zero[t]:
            continue
        diff = mass[t] - zero[t]
        interval = normal_interval(diff, math.hypot(_se(wilson(mass[t], n[t])), _se(wilson(zero[t], n[t]))))
        out.append({"task": t, "mass": mass[t], "zero_shot_max_logit": zero[t], "zero_shot_oracle_head": oracle[t],
                    "difference": diff, "difference_interval": interval, "clearly_below": interval[1] < 0,
                    "below_oracle_head": mass[t] < oracle[t]})  # fmt: skip
    return out


def _ablation_interval(report: Mapping[str, Any], row: Mapping[str, Any]) -> tuple[float, float]:
    """Interval of an ablation row's avg_normalized.

    Without the row's own ``accuracy``, its accuracy is taken as normalized x the expert's test accuracy (the
    report holds no expert accuracy on the validation split).
    """
    n, expert = _sizes(report, row["split"]), report["methods"]["experts"]["accuracy"]
    accuracy = row.get("accuracy") or {t: r * expert[t] for t, r in row["normalized"].items()}
    ses = [_se(wilson(min(1.0, accuracy[t]), n[t])) / expert[t] for t in row["normalized"]]
    return normal_interval(row["avg_normalized"], mean_se(ses))


def intervals(report: Mapping[str, Any]) -> dict[str, Any]:
    """Every accuracy's 95% interval: method rows, the layer sweep's means and the ablation rows."""
    n, ablation = _sizes(report), report.get("ablation")
    sweep = {}
    for row in report["layer_sweep"]:
        ses = [_se(wilson(p, n[t])) for t, p in row["routing_accuracy"].items()]
        sweep[row["layer"]] = normal_interval(row["mean"], mean_se(ses))
    frontier, routers = report.get("frontier"), report.get("routers")
    return {"methods": {name: row_intervals(report, row) for name, row in report["methods"].items()},
            "routers": None if routers is None else {r["name"]: row_intervals(report, r)["avg_normalized"]
                                                     for r in routers["rows"]},
            "layer_sweep": sweep,
            "ablation": None if ablation is None else {ablation_key(r): _ablation_interval(report, r) for r in ablation},
            "frontier": None if frontier is None else {frontier_key(r, split): _split_interval(report, r[split], split)
                                                         for r in frontier for split in ("val", "test")}}


def scaling_summary(report: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """Per (method, T) of the task-scaling points: the mean over subsets and its interval
    (:func:`massmerge.experiments.scaling.summarize`); each subset's own interval as every average's."""
    points = report.get("scaling")
    if not points:
        return None
    flat = [{"T": p["T"], "tasks": p["tasks"],
             "avg_normalized": {m: r["avg_normalized"] for m, r in p["rows"].items()},
             "intervals": {m: row_intervals(report, r)["avg_normalized"] for m, r in p["rows"].items()}}
            for p in points]  # fmt: skip
    return summarize(flat)


def frontier_key(row: Mapping[str, Any], split: str) -> str:
    """A frontier point's key in ``intervals.frontier``: ``l=4 j=2 (val)``."""
    return f"l={row['routing_block']} j={row['restart_block']} ({split})"


def _split_interval(report: Mapping[str, Any], part: Mapping[str, Any], split: str) -> tuple[float, float]:
    """Interval of a frontier point's avg_normalized on ``split`` (as an ablation row's)."""
    return _ablation_interval(report, {**part, "split": split})


def ablation_key(row: Mapping[str, Any]) -> str:
    """An ablation row's key in ``intervals.ablation``: one variant has a validation and a test row."""
    return f"{row['name']} ({row['split']})"


__all__ = ["AVERAGE_GOAL", "MET", "MISSED", "TASK_GOAL", "TSV_M_MARGIN", "UNCLEAR", "UNMEASURED", "Z95",
           "ablation_key", "below_zero_shot", "frontier_key", "intervals", "mass_loss", "mean_se", "normal_interval",
           "row_intervals", "scaling_summary", "status", "targets", "wilson"]
