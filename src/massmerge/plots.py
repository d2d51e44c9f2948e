"""PNG plots of a suite report (matplotlib, Agg backend: no display needed on a CI machine)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

#: Methods drawn in the bar and radar charts (the rest are in the tables).
HEADLINE = ["zero-shot max-logit", "experts", "task_arithmetic max-logit", "ties max-logit", "tsv_m max-logit",
            "iso_cts max-logit", "MASS"]  # fmt: skip


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def _tasks(report: dict[str, Any]) -> list[str]:
    return [t["name"] for t in report["tasks"]]


def _headline(report: dict[str, Any]) -> list[str]:
    return [m for m in HEADLINE if m in report["methods"]]


def per_task_bars(report: dict[str, Any], path: Path) -> None:
    """Grouped bars: absolute accuracy per task (and the average) for the headline methods."""
    tasks, methods = _tasks(report) + ["avg"], _headline(report)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(tasks)), 4.5))
    width = 0.8 / len(methods)
    for i, name in enumerate(methods):
        row = report["methods"][name]
        values = [row["accuracy"][t] for t in tasks[:-1]] + [row["avg_accuracy"]]
        ax.bar(np.arange(len(tasks)) + i * width, values, width, label=name)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=30, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"accuracy per task, task hidden except experts ({report['preset']})")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def radar(report: dict[str, Any], path: Path) -> None:
    """Radar chart of normalized accuracy per task for the headline methods."""
    tasks = _tasks(report)
    angles = np.linspace(0, 2 * np.pi, len(tasks), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(6.5, 6.5), subplot_kw={"polar": True})
    for name in _headline(report):
        values = [report["methods"][name]["normalized"].get(t, 0.0) for t in tasks]
        ax.plot(angles + angles[:1], values + values[:1], label=name, linewidth=1.5)
    ax.set_xticks(angles, tasks, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_title("normalized accuracy (1 = expert)")
    ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.35, 1.1))
    _save(fig, path)


def routing_confusion(report: dict[str, Any], path: Path) -> None:
    """MASS router's top-1 task against the true task, row-normalized."""
    tasks = _tasks(report)
    counts = np.asarray(report["mass"]["confusion"], dtype=float)
    rates = counts / np.clip(counts.sum(1, keepdims=True), 1, None)
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(tasks), 1 + 0.6 * len(tasks)))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xlabel("routed to (top-1)")
    ax.set_ylabel("true task")
    ax.set_title(f"MASS routing confusion ({report['mass']['layer']})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)


def routing_accuracy(report: dict[str, Any], path: Path) -> None:
    """Per task: top-1 routing accuracy and how often the true task is in the selected set."""
    tasks = _tasks(report)
    mass = report["mass"]
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(tasks)), 4))
    ax.bar(x - 0.2, [mass["routing_accuracy"][t] for t in tasks], 0.4, label="top-1 routing accuracy")
    ax.bar(x + 0.2, [mass["selection_recall"][t] for t in tasks], 0.4, label="true task selected")
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title("MASS routing per task")
    ax.legend(fontsize=8)
    _save(fig, path)


def layer_sweep(report: dict[str, Any], path: Path) -> None:
    """Mean top-1 routing accuracy per candidate routing matrix."""
    rows = report["layer_sweep"]
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [r["layer"].replace("encoder.layer.", "L").replace(".intermediate.dense", " mlp")
              .replace(".attention.self.query", " query") for r in rows]  # fmt: skip
    ax.bar(range(len(rows)), [r["mean"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean routing accuracy")
    ax.set_title("routing-layer sweep")
    _save(fig, path)


def write_all(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Every plot of the report, returned as the written paths."""
    jobs = {"per_task.png": per_task_bars, "radar.png": radar, "routing_confusion.png": routing_confusion,
            "routing_accuracy.png": routing_accuracy, "layer_sweep.png": layer_sweep}  # fmt: skip
    paths = []
    for name, fn in jobs.items():
        fn(report, out_dir / name)
        paths.append(out_dir / name)
    return paths
