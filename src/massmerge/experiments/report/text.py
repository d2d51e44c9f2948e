"""The words and cells both renderings of a report share (Markdown and the terminal): percents with their
95% half-widths, target values and goals, the zero-shot flags and the storage sentence."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from massmerge.experiments.report.schema import Interval


def tasks_of(report: Mapping[str, Any]) -> list[str]:
    """The report's task names, in order."""
    return [t["name"] for t in report["tasks"]]


def run_name(report: Mapping[str, Any]) -> str:
    """What ran, in a title: ``suite (distinct)`` or ``evaluate``."""
    return f"suite ({report['preset']})" if report["kind"] == "suite" else "evaluate"


def mean_of(per_task: Mapping[str, float]) -> float:
    """Unweighted mean over tasks, as the runner averages."""
    return sum(per_task.values()) / len(per_task)


def pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def pm(value: float | None, interval: Interval | None) -> str:
    """``80.0 ±3.6``: the wider side of the 95% interval, in points (the exact bounds are in report.json)."""
    if value is None or interval is None:
        return pct(value)
    return f"{pct(value)} ±{100 * max(interval[1] - value, value - interval[0]):.1f}"


def span(interval: Interval | None, signed: bool = False) -> str:
    if interval is None:
        return "-"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f"{fmt.format(100 * interval[0])} to {fmt.format(100 * interval[1])}"


def target_value(target: Mapping[str, Any]) -> str:
    if target["value"] is None:
        return "-"
    if target["unit"] == "normalized difference":
        return f"{100 * target['value']:+.1f} points"
    return f"{pct(target['value'])}%"


def target_goal(target: Mapping[str, Any]) -> str:
    if target["unit"] == "normalized difference":
        return f">= {100 * target['goal']:+.1f} points" if target["goal"] else "> 0 points"
    return f">= {pct(target['goal'])}%"


def flagged(report: Mapping[str, Any]) -> set[str]:
    return {f["task"] for f in report["below_zero_shot"]}


def method_cells(report: Mapping[str, Any], name: str, metric: str) -> list[str]:
    """One table row's cells (value ±half-width), with † on MASS tasks below zero-shot."""
    row, bounds = report["methods"][name], report["intervals"]["methods"][name]
    mark = flagged(report) if name == "MASS" and metric == "accuracy" else set()
    cells = [pm(row[metric].get(t), bounds[metric].get(t)) + (" †" if t in mark else "") for t in tasks_of(report)]
    return cells + [pm(row[f"avg_{metric}"], bounds[f"avg_{metric}"])]


METRIC_TITLES = {"accuracy": "absolute accuracy (%)", "normalized": "normalized accuracy (% of each expert)"}
KIND_NOTE = ("kinds: oracle head = the true task's head is given; task hidden = every task's head competes "
             "(max-logit) and an item counts only with task and class right; oracle routing = MASS's second "
             "pass with the true task as the only selected one; batch routing = MASS routing once per batch of one "
             "task's inputs (the paper's setting; counted as task hidden).")  # fmt: skip
PM_NOTE = ("± = the wider side of the 95% interval, in points (Wilson per task, n = test items; normal over the "
           "task average); exact bounds in report.json.")  # fmt: skip

# ----- terminal --------------------------------------------------------------------------------------------------


LOSS_COLUMNS = {"routing_top1": "routing top-1", "true_task_selected": "true task selected",
                "task_choice": "final task right", "class_given_task": "class right given task right",
                "task_hidden": "MASS (task hidden)"}  # fmt: skip



def zero_shot_lines(report: Mapping[str, Any]) -> list[str]:
    """One sentence per task where MASS is below zero-shot max-logit (or one saying there is none)."""
    if not report["below_zero_shot"]:
        return ["MASS (task hidden) is at or above zero-shot max-logit on every task."]
    lines = []
    for f in report["below_zero_shot"]:
        noise = "clearly below" if f["clearly_below"] else "within noise"
        side = "also below" if f["below_oracle_head"] else "above"
        oracle = f"; {side} the zero-shot oracle head ({pct(f['zero_shot_oracle_head'])})"
        lines.append(f"† {f['task']}: MASS (task hidden) {pct(f['mass'])}% is below zero-shot max-logit "
                     f"{pct(f['zero_shot_max_logit'])}% ({100 * f['difference']:+.1f} points, 95% "
                     f"{span(f['difference_interval'], True)}: {noise}){oracle}.")  # fmt: skip
    return lines


def storage_line(report: Mapping[str, Any]) -> str:
    """The one storage figure, with its unit and the dtypes it assumes."""
    st = report["storage"]
    return (f"Storage: a MASS artifact is {st['bytes_ratio']:.2f}x the base model's bytes, as `massmerge build` "
            f"writes it (the base's {st['base_numel']:,} numbers in {st['base_dtype']} plus {st['factor_numel']:,} "
            f"low-rank factor numbers in {st['factor_dtype']}).")  # fmt: skip


__all__ = ["KIND_NOTE", "LOSS_COLUMNS", "METRIC_TITLES", "PM_NOTE", "flagged", "mean_of", "method_cells", "pct", "pm",
           "run_name", "span", "storage_line", "target_goal", "target_value", "tasks_of", "zero_shot_lines"]
