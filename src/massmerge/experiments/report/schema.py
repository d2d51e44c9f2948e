"""The report's schema: what a front end hands to ``write_report`` and what report.json holds, checked.

``write_report(report, out_dir)`` checks the report against :class:`Report`, adds the derived sections
(intervals, MASS's loss split, the zero-shot flags, units), checks the result against :class:`WrittenReport`,
then writes. A missing or misspelt field fails before anything is written, so a broken report cannot reach
docs/.

report.json, ``schema_version`` 3 (fractions 0-1 throughout; ``units`` says what every number is):

    schema_version: 3
    units: {name: description}
    kind: "suite" | "evaluate"
    preset: str | null                              # the suite's preset; null for evaluate
    config: {routing_layer, eta, top_k, eps, ...every setting of the run}
    finetune: {steps, batch_size, lr, max_length, logit_scale, ...} | null   # the suite's expert training
    tasks: [{name, description, classes: [str], sizes: {train, val, test}, source?: {expert, dataset, ...}}]
    experts?: {task: the expert's cache metadata}
    methods: {row: {kind: "oracle head" | "task hidden" | "oracle routing" | "batch routing",
                    accuracy: {task: frac}, normalized: {task: frac}, avg_accuracy, avg_normalized, storage_factor,
                    merge_seconds?, options?, serving_ratio?, batch_size?}}
    intervals: {methods: {row: {accuracy: {task: [low, high]}, normalized: {task: [low, high]},
                                avg_accuracy: [low, high], avg_normalized: [low, high]}},
                layer_sweep: {layer: [low, high]},          # of the mean top-1 routing accuracy
                ablation: {"name (split)": [low, high]} | null,  # of avg_normalized
                frontier: {"l=L j=J (split)": [low, high]} | null, routers: {name: [low, high]} | null}
    mass: {layer, routing_accuracy, selection_recall, task_choice, class_given_task: {task: frac},
           confusion: [[int]], mean_selected, task_sets} | null       # null when MASS was not run
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
    frontier: [{routing_layer, routing_block, restart_block, cost, throughput,
                val|test: {avg_normalized, normalized: {task: frac}, accuracy: {task: frac}}}] | null
    routers: {rows: [{name, rule, data, routing_accuracy, accuracy, normalized: {task: frac}, avg_accuracy,
                      avg_normalized, val_routing_accuracy, classifier?, features?, setting?}],
              ceiling: row name, loss_split: {task: {task_given, task_hidden, lost, lost_by_best_router_too,
                                                     lost_only_without_data}}} | null
    scaling: [{T, tasks: [str], rows: {method: method row}}] | null      # one per seeded task subset
    scaling_summary: [{method, T, mean, interval: [low, high], values: [float]}] | null   # derived
    throughput: {base_samples_per_s, mass_samples_per_s, ratio, path} | null
    storage: {base_numel, factor_numel, base_dtype, factor_dtype, bytes_ratio} | null
    timing: {name_seconds: float}
    threads: int
    targets: {key: {description, unit: "normalized" | "normalized difference", value, interval: [low, high],
                    goal, status: "met" | "missed" | "not distinguishable from the target" | "not measured",
                    detail}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from massmerge.experiments.report.stats import below_zero_shot, intervals, mass_loss, scaling_summary

SCHEMA_VERSION = 3
#: Rows every report has: the experts are the normalizer of every other row.
REQUIRED_ROWS = ("experts",)
#: Rows the suite always runs (its report reads them by name).
SUITE_ROWS = ("zero-shot", "zero-shot max-logit", "experts", "MASS oracle-head", "MASS")
#: Sections the suite always has (``evaluate`` may lack them).
SUITE_SECTIONS = ("finetune", "mass", "throughput", "storage")
#: What a section a front end leaves out reads as.
DEFAULTS: dict[str, Any] = {"preset": None, "finetune": None, "experts": None, "mass": None, "mass_layers": [],
                            "dropped": {}, "layer_sweep": [], "throughput": None, "storage": None, "ablation": None,
                            "frontier": None, "routers": None, "scaling": None}
#: Tolerance of the check "MASS accuracy = task choice x class given task" (both come from counts).
CONSISTENCY_TOL = 1e-6

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
    "serving_ratio": "per method row: its forward's throughput over a plain forward of the base, same inputs and "
    "batches, measured in the same run",
    "routers": "test split; routing_accuracy: top-1 task; accuracy: strict (task and class right); "
    "val_routing_accuracy: cross-validated on val for trained routers; loss_split: shares 0-1 of each task's "
    "test items",
    "scaling": "avg_normalized over each subset's own tasks; intervals across subsets: mean +- t x sd / sqrt(n)",
    "throughput": "samples per second",
    "timing": "seconds (wall clock)",
    "merge_seconds": "seconds",
    "seconds_per_input": "seconds",
    "targets": "value and goal as fractions 0-1 (unit 'normalized difference': difference of two normalized "
    "averages, 0.05 = 5 points)",
}

# ----- models ----------------------------------------------------------------------------------------------------

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
    source: dict[str, str | None] | None = None  # evaluate: where the expert and the test set came from


class RunSettings(_Open):
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
    kind: Literal["oracle head", "task hidden", "oracle routing", "batch routing"]
    accuracy: PerTask
    normalized: dict[str, Positive]
    avg_accuracy: Fraction
    avg_normalized: Positive
    storage_factor: Positive
    merge_seconds: Positive | None = None
    options: dict[str, Any] | None = None  # a static merge's options, when not the method's defaults
    serving_ratio: Positive | None = None  # a served model's throughput over a plain forward (SMILE)
    batch_size: int | None = None  # batch routing: inputs per single-task batch


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


class FrontierSplit(_Closed):
    avg_normalized: Positive
    normalized: dict[str, Positive]
    accuracy: PerTask


class FrontierRow(_Closed):
    routing_layer: str
    routing_block: int
    restart_block: int
    cost: Positive  # forwards of the base, about (l + 1 + L - j) / L
    val: FrontierSplit
    test: FrontierSplit
    throughput: Positive  # served MASS / plain forward, measured in the same run


class RouterRow(_Closed):
    name: str
    rule: str
    data: str  # what the router needs beyond the experts ("none": data-free)
    routing_accuracy: PerTask
    accuracy: PerTask
    normalized: dict[str, Positive]
    avg_accuracy: Fraction
    avg_normalized: Positive
    val_routing_accuracy: Fraction
    classifier: str | None = None
    features: str | None = None
    setting: float | None = None


class LossSplit(_Closed):
    task_given: Fraction
    task_hidden: Fraction
    lost: Fraction
    lost_by_best_router_too: Fraction
    lost_only_without_data: Fraction


class Routers(_Closed):
    rows: Annotated[list[RouterRow], Field(min_length=1)]
    ceiling: str
    loss_split: dict[str, LossSplit]

    @model_validator(mode="after")
    def _ceiling_is_a_row(self) -> Routers:
        if self.ceiling not in {r.name for r in self.rows}:
            raise ValueError(f"routers.ceiling {self.ceiling!r} is not one of the rows")
        return self


class ScalingPoint(_Closed):
    T: Annotated[int, Field(ge=1)]
    tasks: list[str]
    rows: dict[str, MethodRow]

    @model_validator(mode="after")
    def _rows_cover_the_subset(self) -> ScalingPoint:
        if len(self.tasks) != self.T:
            raise ValueError(f"a scaling point of T = {self.T} lists {len(self.tasks)} tasks")
        for name, row in self.rows.items():
            if set(row.accuracy) != set(self.tasks):
                raise ValueError(f"scaling row {name!r} (T = {self.T}) does not cover its subset's tasks")
        return self


class ScalingSummary(_Closed):
    method: str
    T: int
    mean: Positive
    interval: Interval
    values: list[Positive]


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


class Report(_Closed):
    """What a front end (the suite, ``evaluate``) hands to ``write_report``."""

    kind: Literal["suite", "evaluate"]
    preset: str | None = None
    config: RunSettings
    finetune: FinetuneSettings | None = None
    tasks: Annotated[list[TaskInfo], Field(min_length=1)]
    experts: dict[str, dict[str, Any]] | None = None  # each expert's cache metadata, when the suite adds it
    methods: dict[str, MethodRow]
    mass: MassDetails | None = None
    mass_layers: list[MassDetails] = []
    dropped: dict[str, list[str]] = {}
    layer_sweep: list[SweepRow] = []
    throughput: Throughput | None = None
    storage: Storage | None = None
    timing: dict[str, Positive]
    threads: int
    ablation: list[AblationRow] | None = None
    frontier: list[FrontierRow] | None = None
    routers: Routers | None = None
    scaling: list[ScalingPoint] | None = None
    targets: dict[str, Target]

    @model_validator(mode="after")
    def _consistent(self) -> Report:
        """The rows the report reads exist, per-task figures cover every task, and MASS's parts multiply out."""
        names = [t.name for t in self.tasks]
        required = SUITE_ROWS if self.kind == "suite" else REQUIRED_ROWS
        missing = [r for r in required if r not in self.methods]
        if missing:
            raise ValueError(f"methods lack the rows {missing}")
        if self.kind == "suite":
            absent = [name for name in SUITE_SECTIONS if getattr(self, name) is None]
            if absent:
                raise ValueError(f"a suite report needs the sections {absent}")
        if ("MASS" in self.methods) != (self.mass is not None):
            raise ValueError("a MASS row needs the mass details, and mass details need a MASS row")
        for label, per_task in self._per_task_dicts():
            if set(per_task) != set(names):
                raise ValueError(f"{label} covers {sorted(per_task)}, not the tasks {sorted(names)}")
        if self.mass is not None:
            self._check_mass(self.mass, names)
        return self

    def _check_mass(self, mass: MassDetails, names: list[str]) -> None:
        if len(mass.confusion) != len(names) or any(len(r) != len(names) for r in mass.confusion):
            raise ValueError(f"mass.confusion is not {len(names)} x {len(names)}")
        for t in names:
            product = mass.task_choice[t] * mass.class_given_task[t]
            if abs(product - self.methods["MASS"].accuracy[t]) > CONSISTENCY_TOL:
                raise ValueError(f"task {t}: MASS accuracy {self.methods['MASS'].accuracy[t]} != task_choice x "
                                 f"class_given_task = {product}")  # fmt: skip

    def _per_task_dicts(self) -> list[tuple[str, Mapping[str, float]]]:
        out: list[tuple[str, Mapping[str, float]]] = [
            (f"methods[{name!r}].accuracy", row.accuracy) for name, row in self.methods.items()]
        details = ([self.mass] if self.mass is not None else []) + list(self.mass_layers)
        for i, m in enumerate(details):
            label = "mass" if i == 0 else f"mass_layers[{i - 1}]"
            out += [(f"{label}.{k}", getattr(m, k)) for k in ("routing_accuracy", "selection_recall", "task_choice",
                                                              "class_given_task")]  # fmt: skip
        out += [(f"layer_sweep[{r.layer!r}]", r.routing_accuracy) for r in self.layer_sweep]
        if self.routers is not None:
            out += [(f"routers[{r.name!r}].accuracy", r.accuracy) for r in self.routers.rows]
            out.append(("routers.loss_split", self.routers.loss_split))
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
    frontier: dict[str, Interval] | None = None
    routers: dict[str, Interval] | None = None


class WrittenReport(Report):
    """report.json: the front end's report plus the sections derived here."""

    schema_version: Literal[3]
    units: dict[str, str]
    intervals: Intervals
    mass_loss: dict[str, LossRow]
    below_zero_shot: list[BelowZeroShot]
    scaling_summary: list[ScalingSummary] | None = None


def complete(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report as written: the front end's fields checked, then the derived sections added and checked."""
    Report.model_validate(report)
    report = {**report, **{key: value for key, value in DEFAULTS.items() if key not in report}}
    full = {"schema_version": SCHEMA_VERSION, "units": UNITS, **report, "intervals": intervals(report),
            "mass_loss": mass_loss(report), "below_zero_shot": below_zero_shot(report),
            "scaling_summary": scaling_summary(report)}  # fmt: skip
    WrittenReport.model_validate(full)
    return full


__all__ = ["REQUIRED_ROWS", "Report", "SCHEMA_VERSION", "SUITE_ROWS", "UNITS", "WrittenReport", "complete"]
