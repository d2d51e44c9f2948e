"""PNG plots of a completed report (:func:`massmerge.experiments.report.schema.complete`), all in percent.

Why these choices: the tables are in %, so the plots are too; every bar carries its value, so nobody reads
numbers off an axis; legends sit to the right of the axes, never on the data; error bars are the report's 95%
intervals, so a gap smaller than them reads as noise. matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from massmerge.io.atomic import atomic_write  # noqa: E402

#: Methods drawn per task (the rest are in the tables): task hidden rows first, then the task-given references.
HEADLINE = ("zero-shot max-logit", "task_arithmetic max-logit", "tsv_m max-logit", "MASS", "MASS oracle-head",
            "MASS (task given)", "experts")  # fmt: skip
#: (oracle-head row, task-hidden row, label) pairs whose gap oracle_gap.png shows.
GAP_PAIRS = (("zero-shot", "zero-shot max-logit", "zero-shot"),
             ("task_arithmetic", "task_arithmetic max-logit", "Task Arithmetic"),
             ("tsv_m", "tsv_m max-logit", "TSV-M"),
             ("MASS oracle-head", "MASS", "MASS (true head on its routed features)"))  # fmt: skip
DPI = 110
#: Bar series: label -> (values in %, their 95% intervals in % or None).
Series = Mapping[str, tuple[list[float], list[tuple[float, float]] | None]]
VALUE_FONT = 6


def _save(fig: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))
    plt.close(fig)


def _tasks(report: Mapping[str, Any]) -> list[str]:
    return [t["name"] for t in report["tasks"]]


def _legend_outside(ax: Any) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _label(ax: Any, x: float, y: float, value: float, fmt: str = "{:.0f}") -> None:
    """The bar's value written just above ``y`` (the bar's top or its error bar's top), rotated to fit."""
    ax.text(x, y + 1, fmt.format(value), ha="center", va="bottom", rotation=90, fontsize=VALUE_FONT)


def _grouped_bars(ax: Any, groups: Sequence[str], series: Series, fmt: str = "{:.0f}") -> None:
    """Bars per group, one colour per series, values (in %) written on each bar; intervals as error bars."""
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (label, (values, bounds)) in enumerate(series.items()):
        pos = x - 0.4 + width * (i + 0.5)
        yerr = None if bounds is None else np.maximum(0.0, np.array(  # >= 0: a clipped bound may round past v
            [[v - lo for v, (lo, _) in zip(values, bounds)], [hi - v for v, (_, hi) in zip(values, bounds)]]))
        ax.bar(pos, values, width, label=label, yerr=yerr, capsize=1.5, error_kw={"linewidth": 0.6})
        tops = values if bounds is None else [max(v, hi) for v, (_, hi) in zip(values, bounds)]
        for px, top, v in zip(pos, tops, values):
            _label(ax, px, max(top, 0.0), v, fmt)
    ax.set_xticks(x, groups, rotation=30, ha="right")


def percents(values: Sequence[float]) -> list[float]:
    return [100 * v for v in values]


def _pct_bounds(bounds: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    return [(100 * lo, 100 * hi) for lo, hi in bounds]


def per_task_bars(report: Mapping[str, Any], path: Path) -> None:
    """Absolute accuracy per task and averaged, task hidden and task given, with 95% intervals."""
    tasks = _tasks(report)
    series = {}
    for name in (m for m in HEADLINE if m in report["methods"]):
        row, bounds = report["methods"][name], report["intervals"]["methods"][name]
        values = [row["accuracy"][t] for t in tasks] + [row["avg_accuracy"]]
        series[f"{name}: {row['kind']}"] = (percents(values), _pct_bounds([bounds["accuracy"][t] for t in tasks]
                                                                       + [bounds["avg_accuracy"]]))  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(8, 1.5 * (len(tasks) + 1)), 4.8))
    _grouped_bars(ax, tasks + ["average"], series)
    ax.set_ylabel("accuracy (% of test items)")
    ax.set_ylim(0, 115)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(f"accuracy per task, 95% intervals ({report['preset'] or report['kind']}); task hidden = task and class both right",
                 fontsize=9)  # fmt: skip
    _legend_outside(ax)
    _save(fig, path)


def oracle_gap(report: Mapping[str, Any], path: Path) -> None:
    """Per task: accuracy with the true task's head minus accuracy with the task hidden, in points."""
    tasks, methods = _tasks(report), report["methods"]
    series = {}
    for oracle, hidden, label in GAP_PAIRS:
        if oracle in methods and hidden in methods:
            gaps = [methods[oracle]["accuracy"][t] - methods[hidden]["accuracy"][t] for t in tasks]
            gaps.append(methods[oracle]["avg_accuracy"] - methods[hidden]["avg_accuracy"])
            series[label] = (percents(gaps), None)
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * (len(tasks) + 1)), 4.2))
    _grouped_bars(ax, tasks + ["average"], series)
    ax.axhline(0, color="black", linewidth=0.6)
    top = max([max(v) for v, _ in series.values()] + [10])
    ax.set_ylim(min([min(v) for v, _ in series.values()] + [0]) - 5, top + 12)
    ax.set_ylabel("oracle head − task hidden (points)")
    ax.set_title("accuracy lost by hiding the task (same merged weights, same test items)", fontsize=9)
    _legend_outside(ax)
    _save(fig, path)


#: mass_loss stages: (key, legend label).
STAGES = (("routing_top1", "routing top-1"), ("true_task_selected", "true task among the selected"),
          ("task_choice", "final task right"), ("class_given_task", "class right given task right"),
          ("task_hidden", "MASS, task hidden"))  # fmt: skip
#: Where the items go: (key, legend label, colour), bottom to top of each stacked bar.
OUTCOMES = (("task_hidden", "right", "#2ca02c"), ("wrong_class", "right task, wrong class", "#ff7f0e"),
            ("wrong_final_task", "true task selected, another head won", "#d62728"),
            ("not_selected", "true task not selected", "#7f7f7f"))  # fmt: skip


def _stage_series(report: Mapping[str, Any], stages: Sequence[tuple[str, str]]) -> Series:
    """Per-task values and intervals (in %) of the named mass_loss stages."""
    tasks, loss = _tasks(report), report["mass_loss"]
    return {label: (percents([loss[t][key]["value"] for t in tasks]),
                    _pct_bounds([loss[t][key]["interval"] for t in tasks])) for key, label in stages}  # fmt: skip


def mass_loss(report: Mapping[str, Any], path: Path) -> None:
    """Top: MASS's stages per task with 95% intervals. Bottom: the share of items lost at each stage."""
    tasks, loss = _tasks(report), report["mass_loss"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 1.4 * len(tasks)), 8), sharex=True)
    _grouped_bars(top, tasks, _stage_series(report, STAGES))
    top.set_ylim(0, 115)
    top.set_yticks(range(0, 101, 20))
    top.set_ylabel("% of the task's test items\n(class: of items with the task right)", fontsize=8)
    top.set_title(f"where MASS loses ({report['mass']['layer']})", fontsize=9)
    _legend_outside(top)
    x, base = np.arange(len(tasks)), np.zeros(len(tasks))
    for key, label, colour in OUTCOMES:
        shares = np.array([100 * (loss[t][key]["value"] if key == "task_hidden" else loss[t]["lost"][key])
                           for t in tasks])  # fmt: skip
        bottom.bar(x, shares, 0.6, bottom=base, label=label, color=colour)
        for xi, b, s in zip(x, base, shares):
            if s >= 4:  # a label in a thinner segment would overflow it
                bottom.text(xi, b + s / 2, f"{s:.0f}", ha="center", va="center", fontsize=7, color="white")
        base += shares
    bottom.set_title("where each task's test items go", fontsize=9)
    bottom.set_ylim(0, 100)
    bottom.set_ylabel("% of the task's test items")
    bottom.set_xticks(x, tasks, rotation=30, ha="right")
    handles, labels = bottom.get_legend_handles_labels()  # listed top to bottom, as the segments are stacked
    bottom.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    _save(fig, path)


def routing_confusion(report: Mapping[str, Any], path: Path) -> None:
    """MASS router's top-1 task against the true task, in % of each true task's items."""
    tasks = _tasks(report)
    counts = np.asarray(report["mass"]["confusion"], dtype=float)
    rates = 100 * counts / np.clip(counts.sum(1, keepdims=True), 1, None)
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(tasks), 1 + 0.7 * len(tasks)))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=100)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            ax.text(j, i, f"{rates[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 50 else "black")  # fmt: skip
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xlabel("routed to (top-1)")
    ax.set_ylabel("true task")
    ax.set_title(f"MASS routing confusion, % of each true task ({report['mass']['layer']})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, label="%")
    _save(fig, path)


def routing_accuracy(report: Mapping[str, Any], path: Path) -> None:
    """Per task: top-1 routing accuracy and how often the true task is in the selected set, with 95% intervals."""
    tasks = _tasks(report)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(tasks)), 4))
    _grouped_bars(ax, tasks, _stage_series(report, STAGES[:2]))
    ax.set_ylim(0, 115)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("% of the task's test items")
    ax.set_title(f"MASS routing per task ({report['mass']['layer']})", fontsize=9)
    _legend_outside(ax)
    _save(fig, path)


def short_layer(layer: str) -> str:
    """``encoder.layer.4.intermediate.dense`` -> ``L4 mlp``; other names pass through."""
    return (layer.replace("encoder.layer.", "L").replace(".intermediate.dense", " mlp")
            .replace(".attention.self.query", " query"))  # fmt: skip


def layer_sweep(report: Mapping[str, Any], path: Path) -> None:
    """Mean top-1 routing accuracy per candidate routing matrix (dots, 95% intervals), default and best marked.

    Dots, not bars: the y axis is cut to the data's range, which would make bars lie about their ratios.
    """
    rows, bounds = report["layer_sweep"], report["intervals"]["layer_sweep"]
    x = np.arange(len(rows))
    means = np.array([100 * r["mean"] for r in rows])
    low = means - np.array([100 * bounds[r["layer"]][0] for r in rows])
    high = np.array([100 * bounds[r["layer"]][1] for r in rows]) - means
    recall = np.array([100 * r["selection_recall"] for r in rows])
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(rows)), 4.2))
    ax.errorbar(x, means, yerr=[low, high], fmt="o", color="#1f77b4", capsize=2, label="mean top-1 routing accuracy")
    ax.plot(x, recall, "s", color="#aaaaaa", markersize=4, label="true task among the selected")
    for xi, m, h in zip(x, means, high):
        ax.text(xi, m + h + 0.4, f"{m:.1f}", ha="center", va="bottom", fontsize=VALUE_FONT, rotation=90)
    layers = [r["layer"] for r in rows]
    default = report["config"]["routing_layer"]
    if default in layers:
        ax.axvspan(layers.index(default) - 0.4, layers.index(default) + 0.4, color="#ffdd88", alpha=0.6,
                   label=f"default layer ({short_layer(default)})")  # fmt: skip
    if rows:
        best = int(np.argmax(means))
        ax.plot(x[best], means[best], "*", color="#d62728", markersize=14,
                label=f"best layer ({short_layer(layers[best])})")  # fmt: skip
    floor, ceiling = min([*(means - low), *recall, 100.0]), max([*(means + high), *recall, 0.0])
    ax.set_ylim(max(0.0, floor - 5), min(100.0, ceiling) + 6)
    ax.set_xticks(x, [short_layer(layer) for layer in layers], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("% of test items (mean over tasks)")
    ax.set_title("routing-layer sweep (first pass only)", fontsize=9)
    _legend_outside(ax)
    _save(fig, path)


def frontier(report: Mapping[str, Any], path: Path) -> None:
    """Normalized accuracy (task hidden, val and test) against throughput, one point per (l, j)."""
    rows = report["frontier"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for split, marker in (("val", "o"), ("test", "s")):
        xs = [r["throughput"] for r in rows]
        ys = [100 * r[split]["avg_normalized"] for r in rows]
        ax.scatter(xs, ys, marker=marker, label=f"{split} split", alpha=0.8)
        if split == "test":
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(f"l={r['routing_block']} j={r['restart_block']}", (x, y), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("throughput: served MASS / plain forward (same run)")
    ax.set_ylabel("normalized accuracy, task hidden (%)")
    ax.set_title("beyond two passes: restart block j, routing block l", fontsize=9)
    _legend_outside(ax)
    _save(fig, path)


def scaling(report: Mapping[str, Any], path: Path) -> None:
    """Normalized accuracy against T, one line per method: the mean over task subsets, 95% interval bars, and
    each subset's value as a faint dot."""
    summary = report["scaling_summary"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in summary)):
        rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r["T"])
        xs = np.array([r["T"] for r in rows], dtype=float) + 0.12 * (i - 2)  # a small offset keeps bars apart
        ys = np.array(percents([r["mean"] for r in rows]))
        low = np.maximum(0.0, ys - np.array(percents([r["interval"][0] for r in rows])))
        high = np.maximum(0.0, np.array(percents([r["interval"][1] for r in rows])) - ys)
        line = ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=method, linewidth=1.2)
        for x, r in zip(xs, rows):
            ax.scatter([x] * len(r["values"]), percents(r["values"]), s=6, alpha=0.35, color=line[0].get_color())
    ax.set_xlabel("tasks merged (T)")
    ax.set_ylabel("normalized accuracy (%)")
    ax.set_title("task scaling: mean over seeded task subsets, 95% intervals", fontsize=9)
    _legend_outside(ax)
    _save(fig, path)


#: File name -> the function that draws it.
PLOTS: dict[str, Callable[[Mapping[str, Any], Path], None]] = {
    "per_task.png": per_task_bars, "oracle_gap.png": oracle_gap, "mass_loss.png": mass_loss,
    "routing_accuracy.png": routing_accuracy, "routing_confusion.png": routing_confusion,
    "layer_sweep.png": layer_sweep, "frontier.png": frontier, "scaling.png": scaling,
}  # fmt: skip
#: What a plot needs of the report (a plot without its data is left out, not drawn empty).
NEEDS: dict[str, Callable[[Mapping[str, Any]], bool]] = {
    "oracle_gap.png": lambda r: any(a in r["methods"] and b in r["methods"] for a, b, _ in GAP_PAIRS),
    "mass_loss.png": lambda r: bool(r["mass_loss"]),
    "routing_accuracy.png": lambda r: bool(r["mass_loss"]),
    "routing_confusion.png": lambda r: r["mass"] is not None,
    "layer_sweep.png": lambda r: bool(r["layer_sweep"]),
    "frontier.png": lambda r: bool(r.get("frontier")),
    "scaling.png": lambda r: bool(r.get("scaling_summary")),
}


def available(report: Mapping[str, Any]) -> list[str]:
    """The plots a completed report has the data for, in :data:`PLOTS` order."""
    return [name for name in PLOTS if NEEDS.get(name, lambda r: True)(report)]


def write_all(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Every plot a completed report has the data for, returned as the written paths."""
    paths = []
    for name in available(report):
        PLOTS[name](report, Path(out_dir) / name)
        paths.append(Path(out_dir) / name)
    return paths
