"""The suite's report: where MASS wins and where it loses, with 95% intervals on every accuracy.

``write_report(report, out_dir)`` checks the suite's report against the schema below, adds the derived sections
(intervals, MASS's loss split, the zero-shot flags, units), checks the result again, then writes report.json,
report.md and the plots (each file atomically) and prints the tables. A missing or misspelt field fails before
anything is written, so a broken report cannot reach docs/.

Why intervals: one seed and 160-500 test items a task make a few points of difference noise. Every accuracy
carries a 95% interval and every target is called met, missed or "not distinguishable from the target" from it.

- One task's accuracy: Wilson score interval for a binomial with n = the split's item count.
- An average over tasks: mean +- z * sqrt(sum of the per-task variances) / T, each task's variance taken from
  its Wilson half-width ((high - low) / 2z, which stays positive at 0% and 100%).
- Normalized accuracy divides by the expert's measured accuracy, taken as the fixed yardstick (the target is
  "95% of the experts as measured"), so its interval is the accuracy interval over the expert's accuracy.
- A difference of two methods adds their variances. That ignores that both ran on the same test items (which
  makes the true interval narrower), so it is on the safe side.

report.json, ``schema_version`` 2 (fractions 0-1 throughout; ``units`` says what every number is):

    schema_version: 2
    units: {name: description}
    preset: str
    config: {routing_layer, eta, top_k, eps, ...every suite setting}
    finetune: {steps, batch_size, lr, max_length, logit_scale, ...}
    tasks: [{name, description, classes: [str], sizes: {train, val, test}}]
    experts?: {task: the expert's cache metadata}
    methods: {row: {kind: "oracle head" | "task hidden" | "oracle routing", accuracy: {task: frac},
                    normalized: {task: frac}, avg_accuracy, avg_normalized, storage_factor, merge_seconds?}}
    intervals: {methods: {row: {accuracy: {task: [low, high]}, normalized: {task: [low, high]},
                                avg_accuracy: [low, high], avg_normalized: [low, high]}},
                layer_sweep: {layer: [low, high]},          # of the mean top-1 routing accuracy
                ablation: {"name (split)": [low, high]} | null}  # of avg_normalized
    mass: {layer, routing_accuracy, selection_recall, task_choice, class_given_task: {task: frac},
           confusion: [[int]], mean_selected, task_sets}
    mass_layers: [same as mass, one per routing layer evaluated with the full model]
    mass_loss: {task: {routing_top1, true_task_selected, task_choice, class_given_task, task_hidden:
                       {value, interval: [low, high], n},
                       lost: {not_selected, wrong_final_task, wrong_class}}}   # shares of the task's items
    below_zero_shot: [{task, mass, zero_shot_max_logit, zero_shot_oracle_head, difference,
                       difference_interval: [low, high], clearly_below, below_oracle_head}]
    dropped: {matrix key: [task]}
    layer_sweep: [{layer, routing_accuracy: {task: frac}, mean, selection_recall}]
    ablation: [{name, settings, split, avg_normalized, normalized, routing_accuracy, seconds_per_input,
                accuracy?}] | null
    throughput: {base_samples_per_s, mass_samples_per_s, ratio, path}
    storage: {base_numel, factor_numel, base_dtype, factor_dtype, bytes_ratio}
    timing: {name_seconds: float}
    threads: int
    targets: {key: {description, unit: "normalized" | "normalized difference", value, interval: [low, high],
                    goal, status: "met" | "missed" | "not distinguishable from the target" | "not measured",
                    detail}}

report.md shows percents (and differences in points) and says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from massmerge import plots
from massmerge.io.atomic import atomic_write

SCHEMA_VERSION = 2
#: Two-sided 95% normal quantile.
Z95 = 1.959963984540054
#: Design.md section 7: MASS keeps this share of the experts on average ...
AVERAGE_GOAL = 0.95
#: ... and at least this share on every task ...
TASK_GOAL = 0.85
#: ... and beats TSV-M by this many points of normalized accuracy.
TSV_M_MARGIN = 0.05
#: Rows the report reads by name, so the schema insists on them.
REQUIRED_ROWS = ("zero-shot", "zero-shot max-logit", "experts", "MASS oracle-head", "MASS")
#: Tolerance of the check "MASS accuracy = task choice x class given task" (both come from counts).
CONSISTENCY_TOL = 1e-6

MET, MISSED, UNCLEAR, UNMEASURED = "met", "missed", "not distinguishable from the target", "not measured"

UNITS = {
    "accuracy": "fraction of the split's items, 0-1; task hidden rows count an item only with task and class right",
    "normalized": "accuracy over the expert's accuracy on the same split, 0-1 (1 = the expert; can exceed 1)",
    "intervals": "[low, high], 95%: Wilson score per task (n = the split's items); averages over tasks: mean +- "
    "1.96 x sqrt(sum of per-task variances) / T, each variance from the Wilson half-width; normalized: the "
    "accuracy interval over the expert's accuracy; differences add variances (wider than the paired truth)",
    "mass": "fractions 0-1 of each task's test items, except class_given_task: of the items whose final task is "
    "right; task hidden accuracy = task_choice x class_given_task",
    "mass_loss.lost": "shares 0-1 of the task's test items: true task not selected, selected but another task's "
    "head won, right task but wrong class; with task_hidden they sum to 1",
    "storage.bytes_ratio": "the MASS artifact's bytes as `massmerge build` writes it (base tensors in base_dtype, "
    "low-rank factors in factor_dtype) over the base model's bytes; the one storage figure",
    "storage_factor": "per method row: stored tensor elements over the base's (counts, not bytes)",
    "throughput": "samples per second",
    "timing": "seconds (wall clock)",
    "merge_seconds": "seconds",
    "seconds_per_input": "seconds",
    "targets": "value and goal as fractions 0-1 (unit 'normalized difference': difference of two normalized "
    "averages, 0.05 = 5 points)",
}

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


def _mean(per_task: Mapping[str, float]) -> float:
    """Unweighted mean over tasks, as the suite averages."""
    return sum(per_task.values()) / len(per_task)


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
    mass = report["methods"]["MASS"]
    mass_se = _avg_normalized_se(report, "MASS")
    pts = f"{100 * TSV_M_MARGIN:.0f} points of normalized accuracy"
    return {
        "mass_average": _target(
            f"MASS (task hidden) keeps at least {100 * AVERAGE_GOAL:.0f}% of the experts' accuracy on average",
            "normalized", mass["avg_normalized"], normal_interval(mass["avg_normalized"], mass_se), AVERAGE_GOAL),
        "mass_every_task": _every_task(report),
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
    mass, n = report["mass"], _sizes(report)
    out = {}
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
    mass, zero, oracle = (methods[k]["accuracy"] for k in ("MASS", "zero-shot max-logit", "zero-shot"))
    out = []
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
    return {"methods": {name: row_intervals(report, row) for name, row in report["methods"].items()},
            "layer_sweep": sweep,
            "ablation": None if ablation is None else {ablation_key(r): _ablation_interval(report, r) for r in ablation}}


def ablation_key(row: Mapping[str, Any]) -> str:
    """An ablation row's key in ``intervals.ablation``: one variant has a validation and a test row."""
    return f"{row['name']} ({row['split']})"


def complete(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report as written: the suite's fields checked, then the derived sections added and checked."""
    SuiteReport.model_validate(report)
    full = {"schema_version": SCHEMA_VERSION, "units": UNITS, **report, "intervals": intervals(report),
            "mass_loss": mass_loss(report), "below_zero_shot": below_zero_shot(report)}  # fmt: skip
    full.setdefault("ablation", None)
    WrittenReport.model_validate(full)
    return full


# ----- schema ----------------------------------------------------------------------------------------------------

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(ge=0.0)]
Interval = tuple[float, float]
PerTask = dict[str, Fraction]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Sizes(_Closed):
    train: int
    val: int
    test: Annotated[int, Field(ge=1)]


class TaskInfo(_Closed):
    name: str
    description: str
    classes: list[str]
    sizes: Sizes


class SuiteSettings(_Open):
    routing_layer: str
    eta: float
    top_k: int
    eps: float | None


class FinetuneSettings(_Open):
    steps: int
    batch_size: int
    lr: float
    max_length: int
    logit_scale: float


class MethodRow(_Closed):
    kind: Literal["oracle head", "task hidden", "oracle routing"]
    accuracy: PerTask
    normalized: dict[str, Positive]
    avg_accuracy: Fraction
    avg_normalized: Positive
    storage_factor: Positive
    merge_seconds: Positive | None = None


class MassDetails(_Closed):
    layer: str
    routing_accuracy: PerTask
    selection_recall: PerTask
    task_choice: PerTask
    class_given_task: PerTask
    confusion: list[list[int]]
    mean_selected: Positive
    task_sets: int


class SweepRow(_Closed):
    layer: str
    routing_accuracy: PerTask
    mean: Fraction
    selection_recall: Fraction


class AblationRow(_Closed):
    name: str
    settings: dict[str, Any]
    split: Literal["val", "test"]
    avg_normalized: Positive
    normalized: dict[str, Positive]
    routing_accuracy: PerTask
    seconds_per_input: Positive
    accuracy: PerTask | None = None


class Throughput(_Closed):
    base_samples_per_s: Positive
    mass_samples_per_s: Positive
    ratio: Positive
    path: str


class Storage(_Closed):
    base_numel: Annotated[int, Field(ge=1)]
    factor_numel: Annotated[int, Field(ge=0)]
    base_dtype: str
    factor_dtype: str
    bytes_ratio: Annotated[float, Field(gt=0.0)]


class Target(_Closed):
    description: str
    unit: Literal["normalized", "normalized difference"]
    value: float | None
    interval: Interval | None
    goal: float
    status: Literal["met", "missed", "not distinguishable from the target", "not measured"]
    detail: str


class SuiteReport(_Closed):
    """What the suite hands to ``write_report``."""

    schema_version: Literal[2]
    preset: str
    config: SuiteSettings
    finetune: FinetuneSettings
    tasks: Annotated[list[TaskInfo], Field(min_length=1)]
    experts: dict[str, dict[str, Any]] | None = None  # each expert's cache metadata, when the suite adds it
    methods: dict[str, MethodRow]
    mass: MassDetails
    mass_layers: list[MassDetails]
    dropped: dict[str, list[str]]
    layer_sweep: list[SweepRow]
    throughput: Throughput
    storage: Storage
    timing: dict[str, Positive]
    threads: int
    ablation: list[AblationRow] | None = None
    targets: dict[str, Target]

    @model_validator(mode="after")
    def _consistent(self) -> SuiteReport:
        """The rows the report reads exist, per-task figures cover every task, and MASS's parts multiply out."""
        names = [t.name for t in self.tasks]
        missing = [r for r in REQUIRED_ROWS if r not in self.methods]
        if missing:
            raise ValueError(f"methods lack the rows {missing}")
        for label, per_task in self._per_task_dicts():
            if set(per_task) != set(names):
                raise ValueError(f"{label} covers {sorted(per_task)}, not the tasks {sorted(names)}")
        if len(self.mass.confusion) != len(names) or any(len(r) != len(names) for r in self.mass.confusion):
            raise ValueError(f"mass.confusion is not {len(names)} x {len(names)}")
        for t in names:
            product = self.mass.task_choice[t] * self.mass.class_given_task[t]
            if abs(product - self.methods["MASS"].accuracy[t]) > CONSISTENCY_TOL:
                raise ValueError(f"task {t}: MASS accuracy {self.methods['MASS'].accuracy[t]} != task_choice x "
                                 f"class_given_task = {product}")  # fmt: skip
        return self

    def _per_task_dicts(self) -> list[tuple[str, Mapping[str, float]]]:
        out: list[tuple[str, Mapping[str, float]]] = [
            (f"methods[{name!r}].accuracy", row.accuracy) for name, row in self.methods.items()]
        for i, m in enumerate([self.mass, *self.mass_layers]):
            label = "mass" if i == 0 else f"mass_layers[{i - 1}]"
            out += [(f"{label}.{k}", getattr(m, k)) for k in ("routing_accuracy", "selection_recall", "task_choice",
                                                              "class_given_task")]  # fmt: skip
        out += [(f"layer_sweep[{r.layer!r}]", r.routing_accuracy) for r in self.layer_sweep]
        return out


class Estimate(_Closed):
    value: Fraction
    interval: Interval
    n: int


class LostShares(_Closed):
    not_selected: Fraction
    wrong_final_task: Fraction
    wrong_class: Fraction


class LossRow(_Closed):
    routing_top1: Estimate
    true_task_selected: Estimate
    task_choice: Estimate
    class_given_task: Estimate
    task_hidden: Estimate
    lost: LostShares


class BelowZeroShot(_Closed):
    task: str
    mass: Fraction
    zero_shot_max_logit: Fraction
    zero_shot_oracle_head: Fraction
    difference: float
    difference_interval: Interval
    clearly_below: bool
    below_oracle_head: bool


class RowIntervals(_Closed):
    accuracy: dict[str, Interval]
    normalized: dict[str, Interval]
    avg_accuracy: Interval
    avg_normalized: Interval


class Intervals(_Closed):
    methods: dict[str, RowIntervals]
    layer_sweep: dict[str, Interval]
    ablation: dict[str, Interval] | None


class WrittenReport(SuiteReport):
    """report.json: the suite's report plus the sections derived here."""

    units: dict[str, str]
    intervals: Intervals
    mass_loss: dict[str, LossRow]
    below_zero_shot: list[BelowZeroShot]


# ----- text ------------------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _pm(value: float | None, interval: Interval | None) -> str:
    """``80.0 ±3.6``: the wider side of the 95% interval, in points (the exact bounds are in report.json)."""
    if value is None or interval is None:
        return _pct(value)
    return f"{_pct(value)} ±{100 * max(interval[1] - value, value - interval[0]):.1f}"


def _span(interval: Interval | None, signed: bool = False) -> str:
    if interval is None:
        return "-"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f"{fmt.format(100 * interval[0])} to {fmt.format(100 * interval[1])}"


def _target_value(target: Mapping[str, Any]) -> str:
    if target["value"] is None:
        return "-"
    if target["unit"] == "normalized difference":
        return f"{100 * target['value']:+.1f} points"
    return f"{_pct(target['value'])}%"


def _target_goal(target: Mapping[str, Any]) -> str:
    if target["unit"] == "normalized difference":
        return f">= {100 * target['goal']:+.1f} points" if target["goal"] else "> 0 points"
    return f">= {_pct(target['goal'])}%"


def _flagged(report: Mapping[str, Any]) -> set[str]:
    return {f["task"] for f in report["below_zero_shot"]}


def _method_cells(report: Mapping[str, Any], name: str, metric: str) -> list[str]:
    """One table row's cells (value ±half-width), with † on MASS tasks below zero-shot."""
    row, bounds = report["methods"][name], report["intervals"]["methods"][name]
    mark = _flagged(report) if name == "MASS" and metric == "accuracy" else set()
    cells = [_pm(row[metric].get(t), bounds[metric].get(t)) + (" †" if t in mark else "") for t in _tasks(report)]
    return cells + [_pm(row[f"avg_{metric}"], bounds[f"avg_{metric}"])]


METRIC_TITLES = {"accuracy": "absolute accuracy (%)", "normalized": "normalized accuracy (% of each expert)"}
KIND_NOTE = ("kinds: oracle head = the true task's head is given; task hidden = every task's head competes "
             "(max-logit) and an item counts only with task and class right; oracle routing = MASS's second "
             "pass with the true task as the only selected one.")  # fmt: skip
PM_NOTE = ("± = the wider side of the 95% interval, in points (Wilson per task, n = test items; normal over the "
           "task average); exact bounds in report.json.")  # fmt: skip

# ----- terminal --------------------------------------------------------------------------------------------------


def terminal_table(report: Mapping[str, Any], metric: str = "accuracy") -> Table:
    """A rich table: one row per method, one column per task plus the average, each value with its ±."""
    table = Table(title=f"massmerge suite ({escape(report['preset'])}): {METRIC_TITLES[metric]}", caption=PM_NOTE)
    table.add_column("method")
    table.add_column("kind", style="dim")
    for task in _tasks(report):
        table.add_column(escape(task), justify="right")
    table.add_column("avg", justify="right", style="bold")
    for name, row in report["methods"].items():
        cells = [escape(c) for c in _method_cells(report, name, metric)]
        table.add_row(escape(name), row["kind"], *cells, style="bold green" if name == "MASS" else None)
    return table


LOSS_COLUMNS = {"routing_top1": "routing top-1", "true_task_selected": "true task selected",
                "task_choice": "final task right", "class_given_task": "class right given task right",
                "task_hidden": "MASS (task hidden)"}  # fmt: skip


def loss_table(report: Mapping[str, Any]) -> Table:
    """MASS's accuracy per task split into routing, selection, final task choice and class."""
    table = Table(title="where MASS loses (%, 95% ±)")
    table.add_column("task")
    for label in LOSS_COLUMNS.values():
        table.add_column(escape(label), justify="right")
    for task, row in report["mass_loss"].items():
        cells = [_pm(row[k]["value"], row[k]["interval"]) for k in LOSS_COLUMNS]
        table.add_row(escape(task) + (" †" if task in _flagged(report) else ""), *cells)
    return table


def _status_markup(value: str) -> str:
    color = {MET: "green", MISSED: "red"}.get(value, "yellow")
    return f"[{color}]{escape(value)}[/{color}]"


def print_report(report: Mapping[str, Any], console: Console | None = None) -> None:
    """Tables, MASS's loss split, zero-shot flags, targets and the storage figure on the terminal."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: do not squeeze the task columns into 80 characters
            console = Console(width=200)
    console.print(terminal_table(report, "accuracy"))
    console.print(terminal_table(report, "normalized"))
    console.print(loss_table(report))
    for line in zero_shot_lines(report):
        console.print(escape(line))
    for target in report["targets"].values():
        console.print(f"target: {escape(target['description'])}: {escape(_target_value(target))} "
                      f"(95% {escape(_span(target['interval'], target['unit'] != 'normalized'))}; goal "
                      f"{escape(_target_goal(target))}) {_status_markup(target['status'])}")  # fmt: skip
    console.print(escape(storage_line(report)))


def zero_shot_lines(report: Mapping[str, Any]) -> list[str]:
    """One sentence per task where MASS is below zero-shot max-logit (or one saying there is none)."""
    if not report["below_zero_shot"]:
        return ["MASS (task hidden) is at or above zero-shot max-logit on every task."]
    lines = []
    for f in report["below_zero_shot"]:
        noise = "clearly below" if f["clearly_below"] else "within noise"
        side = "also below" if f["below_oracle_head"] else "above"
        oracle = f"; {side} the zero-shot oracle head ({_pct(f['zero_shot_oracle_head'])})"
        lines.append(f"† {f['task']}: MASS (task hidden) {_pct(f['mass'])}% is below zero-shot max-logit "
                     f"{_pct(f['zero_shot_max_logit'])}% ({100 * f['difference']:+.1f} points, 95% "
                     f"{_span(f['difference_interval'], True)}: {noise}){oracle}.")  # fmt: skip
    return lines


def storage_line(report: Mapping[str, Any]) -> str:
    """The one storage figure, with its unit and the dtypes it assumes."""
    st = report["storage"]
    return (f"Storage: a MASS artifact is {st['bytes_ratio']:.2f}x the base model's bytes, as `massmerge build` "
            f"writes it (the base's {st['base_numel']:,} numbers in {st['base_dtype']} plus {st['factor_numel']:,} "
            f"low-rank factor numbers in {st['factor_dtype']}).")  # fmt: skip


# ----- markdown --------------------------------------------------------------------------------------------------


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_head(cells: Sequence[str]) -> list[str]:
    return [_md_row(cells), "|" + "---|" * len(cells)]


def _md_methods(report: Mapping[str, Any], metric: str) -> list[str]:
    lines = _md_head(["method", "kind", *_tasks(report), "avg"])
    for name, row in report["methods"].items():
        cells = _method_cells(report, name, metric)
        if name == "MASS":
            name, cells[-1] = f"**{name}**", f"**{cells[-1]}**"
        lines.append(_md_row([name, row["kind"], *cells]))
    return lines


def _router_text(cfg: Mapping[str, Any]) -> str:
    """The served router in words: pooling, routing layers and how they combine (when the report records them)."""
    serve = cfg.get("serve_settings") or {}
    layers = serve.get("routing_layers") or [cfg["routing_layer"]]
    if len(layers) == 1:
        where = f"routing layer `{layers[0]}`"
    else:
        where = f"{len(layers)} routing layers up to `{layers[-1]}` ({serve.get('layer_combine')})"
    return f"{where}, {serve['pooling']} pooling" if "pooling" in serve else where


def _md_setup(report: Mapping[str, Any]) -> list[str]:
    ft, cfg = report["finetune"], report["config"]
    return [f"# massmerge offline suite: preset `{report['preset']}`", "",
            f"Backbone all-MiniLM-L6-v2; {len(report['tasks'])} tasks; experts fine-tune the whole encoder against "
            f"frozen zero-shot heads ({ft['steps']} steps, batch {ft['batch_size']}, lr {ft['lr']}, max length "
            f"{ft['max_length']}, logit scale {ft['logit_scale']}). MASS: {_router_text(cfg)}, "
            f"eta {cfg['eta']}, K {cfg['top_k']}, eps {cfg['eps']}.", "",
            "**Units.** Accuracies are percents of a task's test items (report.json holds the same figures as "
            "fractions 0-1); normalized accuracy is a percent of the expert's accuracy on the same test split; "
            "differences are in points. " + PM_NOTE + " " + KIND_NOTE, ""]  # fmt: skip


def _md_targets(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Targets (design.md section 7)", "",
             "Met: the whole 95% interval clears the goal; missed: it lies wholly short; otherwise the run cannot "
             "tell the figure from its goal.", "",
             *_md_head(["target", "value", "95% interval", "goal", "status"])]  # fmt: skip
    for t in report["targets"].values():
        detail = f" ({t['detail']})" if t["detail"] else ""
        span = _span(t["interval"], signed=t["unit"] != "normalized")
        status_cell = f"**{t['status']}**"
        lines.append(_md_row([t["description"] + detail, _target_value(t), span, _target_goal(t), status_cell]))
    return lines


def _md_loss(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Where MASS loses", "",
             "Task hidden, MASS answers an item right when the router selects the true task, the true task's head "
             "wins the final max-logit choice, and the class is right. Stages in % (95% ±); \"class right given "
             "task right\" is over the items whose final task is right, so MASS (task hidden) = final task right x "
             "class right given task right.", "", *_md_head(["task", *LOSS_COLUMNS.values()])]  # fmt: skip
    flagged = _flagged(report)
    for task, row in report["mass_loss"].items():
        cells = [_pm(row[k]["value"], row[k]["interval"]) for k in LOSS_COLUMNS]
        lines.append(_md_row([task + (" †" if task in flagged else ""), *cells]))
    lines += ["", "Where each task's test items go (% of the task's items; the four columns sum to 100):", "",
              *_md_head(["task", "right", "lost: wrong class", "lost: another selected task won",
                         "lost: true task not selected"])]  # fmt: skip
    for task, row in report["mass_loss"].items():
        lost = row["lost"]
        lines.append(_md_row([task, _pct(row["task_hidden"]["value"]), _pct(lost["wrong_class"]),
                              _pct(lost["wrong_final_task"]), _pct(lost["not_selected"])]))  # fmt: skip
    return lines + ["", *zero_shot_lines(report)]


def _md_layers(report: Mapping[str, Any]) -> list[str]:
    """The MASS model at each evaluated routing layer (task averages), when there is more than one."""
    if len(report["mass_layers"]) < 2:
        return []
    lines = ["", "## MASS per routing layer (task averages, %)", "",
             *_md_head(["layer", *list(LOSS_COLUMNS.values())[:4], "mean tasks selected"])]
    for m in report["mass_layers"]:
        stages = ("routing_accuracy", "selection_recall", "task_choice", "class_given_task")
        lines.append(_md_row([f"`{m['layer']}`", *(_pct(_mean(m[k])) for k in stages), f"{m['mean_selected']:.2f}"]))
    return lines


def _md_sweep(report: Mapping[str, Any]) -> list[str]:
    tasks, rows = _tasks(report), report["layer_sweep"]
    best = max(rows, key=lambda r: r["mean"])["layer"] if rows else None
    lines = ["## Routing-layer sweep (top-1 routing accuracy %, first pass only)", "",
             *_md_head(["layer", *tasks, "mean (95% ±)", "true task selected"])]  # fmt: skip
    for row in rows:
        marks = [m for m, on in (("default", row["layer"] == report["config"]["routing_layer"]),
                                 ("best", row["layer"] == best)) if on]  # fmt: skip
        label = f"`{row['layer']}`" + (f" ({', '.join(marks)})" if marks else "")
        cells = [_pct(row["routing_accuracy"][t]) for t in tasks]
        lines.append(_md_row([label, *cells, _pm(row["mean"], report["intervals"]["layer_sweep"][row["layer"]]),
                              _pct(row["selection_recall"])]))  # fmt: skip
    return lines


def _setting_text(key: str, value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) > 2:  # multi-layer routing: dozens of names
        return f"{key}={len(value)} layers ({value[0]} ... {value[-1]})"
    return f"{key}={value}"


def _settings_column(row: Mapping[str, Any], reference: Mapping[str, Any]) -> str:
    """The first variant's settings in full, every other variant's as its differences from the first."""
    if row is reference:
        items = row["settings"].items()
    else:
        items = [(k, v) for k, v in row["settings"].items() if reference["settings"].get(k) != v]
    return ", ".join(_setting_text(k, v) for k, v in items) or "as the first row"


def _md_ablation(report: Mapping[str, Any]) -> list[str]:
    rows = report.get("ablation")
    if not rows:
        return []
    tasks, reference = _tasks(report), rows[0]
    lines = ["", "## Router ablation", "",
             "Normalized accuracy (% of each expert; 95% ±) and mean top-1 routing accuracy, per router variant "
             "(settings: the first row's in full, the others' as their differences from it). Defaults are chosen "
             "on the val rows.", "",
             *_md_head(["variant", "settings", "split", "avg normalized", *tasks, "routing top-1", "ms / input"])]
    for r in rows:
        avg = _pm(r["avg_normalized"], report["intervals"]["ablation"][ablation_key(r)])
        per_task = [_pct(r["normalized"].get(t)) for t in tasks]
        lines.append(_md_row([r["name"], _settings_column(r, reference), r["split"], avg, *per_task,
                              _pct(_mean(r["routing_accuracy"])), f"{1000 * r['seconds_per_input']:.1f}"]))
    lines += ["", "Top-1 routing accuracy per task (%), per router variant:", "",
              *_md_head(["variant", "split", *tasks, "mean"])]
    for r in rows:
        lines.append(_md_row([r["name"], r["split"], *[_pct(r["routing_accuracy"].get(t)) for t in tasks],
                              _pct(_mean(r["routing_accuracy"]))]))
    return lines


def _md_tasks(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Tasks", "", *_md_head(["task", "description", "classes", "train", "val", "test"])]
    for t in report["tasks"]:
        s = t["sizes"]
        lines.append(_md_row([t["name"], t["description"], str(len(t["classes"])), str(s["train"]), str(s["val"]),
                              str(s["test"])]))  # fmt: skip
    return lines


def _md_footer(report: Mapping[str, Any]) -> list[str]:
    thr, tm = report["throughput"], report["timing"]
    timed = {name: row["merge_seconds"] for name, row in report["methods"].items()
             if row.get("merge_seconds") is not None}  # fmt: skip
    merges = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timed.items())
    dropped = "; ".join(f"`{k}`: {', '.join(v)}" for k, v in report["dropped"].items()) or "nothing"
    return ["## Storage, speed, time", "", f"- {storage_line(report)}",
            f"- Throughput ({thr['path']}): base {thr['base_samples_per_s']:.1f} samples/s, MASS "
            f"{thr['mass_samples_per_s']:.1f} samples/s (MASS / base = {thr['ratio']:.2f}).",
            f"- Merge time: {merges or '-'}.",
            "- Wall time: " + ", ".join(f"{k.removesuffix('_seconds')} {v:.0f} s" for k, v in tm.items())
            + f" on {report['threads']} threads.",
            f"- De-redundancy left out of the first pass: {dropped}.", "",
            "Plots (all in %): " + ", ".join(plots.PLOTS) + ".", ""]  # fmt: skip


def markdown(report: Mapping[str, Any]) -> str:
    """report.md: setup and units, targets, where MASS loses, both accuracy tables, routing, ablation, costs."""
    tables = ["", "## Absolute accuracy (%)", "", *_md_methods(report, "accuracy"), "",
              "† MASS (task hidden) below zero-shot max-logit on this task.", "",
              "## Normalized accuracy (% of each expert on the same test split)", "",
              *_md_methods(report, "normalized")]
    sections = [_md_setup(report), _md_targets(report), [""], _md_loss(report), [""], _md_tasks(report), tables,
                _md_layers(report), [""], _md_sweep(report), _md_ablation(report), [""], _md_footer(report)]
    return "\n".join(line for section in sections for line in section)


# ----- files -----------------------------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_report(report: Mapping[str, Any], out_dir: Path, *, console: Console | None = None,
                 show: bool = True) -> dict[str, Any]:  # fmt: skip
    """Check ``report``, write report.json, report.md and the plots into ``out_dir``; return the written report.

    Raises pydantic.ValidationError (naming the field) before writing anything when the report breaks the schema.
    """
    full = complete(report)
    out_dir = Path(out_dir)
    _write_text(out_dir / "report.json", json.dumps(full, indent=2, allow_nan=False))
    _write_text(out_dir / "report.md", markdown(full))
    plots.write_all(full, out_dir)
    if show:
        print_report(full, console)
    return full
