"""A synthetic report of the suite's shape (no training, no data needed), for the report writers' tests.

Numbers are chosen so the checks can fail: task ``b`` has MASS below zero-shot, the MASS vs TSV-M targets
land on both sides, TSV-M ties Task Arithmetic.
"""

from __future__ import annotations

from typing import Any

from massmerge.experiments.report.stats import targets

TASKS = {"a": 100, "b": 200, "c": 160}  # test items per task
EXPERT = {"a": 0.9, "b": 0.8, "c": 0.95}
DEFAULT_LAYER = "encoder.layer.4.intermediate.dense"
BEST_LAYER = "encoder.layer.2.intermediate.dense"


def _row(kind: str, accuracy: dict[str, float], **extra: Any) -> dict[str, Any]:
    normalized = {t: accuracy[t] / EXPERT[t] for t in accuracy}
    return {"kind": kind, "accuracy": accuracy, "normalized": normalized,
            "avg_accuracy": sum(accuracy.values()) / len(accuracy),
            "avg_normalized": sum(normalized.values()) / len(normalized), "storage_factor": 1.0, **extra}  # fmt: skip


def _mass_details(layer: str) -> dict[str, Any]:
    """From counts: items with the final task right and with task and class right, per task."""
    task_right, both_right = {"a": 90, "b": 120, "c": 150}, {"a": 80, "b": 100, "c": 144}
    return {"layer": layer, "routing_accuracy": {"a": 0.85, "b": 0.55, "c": 0.95},
            "selection_recall": {"a": 0.95, "b": 0.7, "c": 0.975},
            "task_choice": {t: task_right[t] / n for t, n in TASKS.items()},
            "class_given_task": {t: both_right[t] / task_right[t] for t in TASKS},
            "confusion": [[85, 10, 5], [40, 110, 50], [4, 4, 152]], "mean_selected": 1.6, "task_sets": 5}  # fmt: skip


def fake_report(**extra: Any) -> dict[str, Any]:
    """A report as the suite hands it over (contract of issue 12), with targets computed by suite_report."""
    methods = {
        "zero-shot": _row("oracle head", {"a": 0.5, "b": 0.6, "c": 0.6}),
        "zero-shot max-logit": _row("task hidden", {"a": 0.3, "b": 0.55, "c": 0.4}),
        "experts": _row("oracle head", dict(EXPERT), storage_factor=3.0),
        "task_arithmetic": _row("oracle head", {"a": 0.85, "b": 0.75, "c": 0.92}, merge_seconds=1.0),
        "task_arithmetic max-logit": _row("task hidden", {"a": 0.45, "b": 0.38, "c": 0.55}),
        "tsv_m": _row("oracle head", {"a": 0.85, "b": 0.75, "c": 0.92}, merge_seconds=2.0),
        "tsv_m max-logit": _row("task hidden", {"a": 0.5, "b": 0.4, "c": 0.6}),
        "MASS (task given)": _row("oracle routing", {"a": 0.9, "b": 0.78, "c": 0.95}),
        "MASS oracle-head": _row("oracle head", {"a": 0.85, "b": 0.7, "c": 0.93}),
        "MASS": _row("task hidden", {"a": 0.8, "b": 0.5, "c": 0.9}),
    }  # fmt: skip
    sweep = [{"layer": DEFAULT_LAYER, "routing_accuracy": {"a": 0.85, "b": 0.55, "c": 0.95}, "mean": 0.78333,
              "selection_recall": 0.87},
             {"layer": BEST_LAYER, "routing_accuracy": {"a": 0.9, "b": 0.6, "c": 0.93}, "mean": 0.81,
              "selection_recall": 0.9}]  # fmt: skip
    report = {
        "kind": "suite", "preset": "fake",
        "config": {"routing_layer": DEFAULT_LAYER, "eta": 0.2, "top_k": 3, "eps": 0.3, "seed": 0},
        "finetune": {"steps": 1, "batch_size": 2, "lr": 1e-5, "max_length": 8, "logit_scale": 20.0},
        "tasks": [{"name": t, "description": f"task {t} [demo]", "classes": ["x", "y"],
                   "sizes": {"train": 5 * n, "val": n // 2, "test": n}} for t, n in TASKS.items()],
        "methods": methods, "mass": _mass_details(DEFAULT_LAYER),
        "mass_layers": [_mass_details(DEFAULT_LAYER), _mass_details(BEST_LAYER)],
        "dropped": {"encoder.layer.0.attention.self.query.weight": ["b"]}, "layer_sweep": sweep,
        "throughput": {"base_samples_per_s": 100.0, "mass_samples_per_s": 45.0, "ratio": 0.45, "path": "batched"},
        "storage": {"base_numel": 22_713_216, "factor_numel": 28_383_105, "base_dtype": "float32",
                    "factor_dtype": "float16", "bytes_ratio": 1 + 28_383_105 * 2 / (22_713_216 * 4)},
        "timing": {"finetune_seconds": 1.0, "total_seconds": 2.0}, "threads": 2, **extra,
    }  # fmt: skip
    report["targets"] = targets(report)
    return report


def _ablation() -> list[dict[str, Any]]:
    variants = (("paper router", 1, 0.71), ("ours", 3, 0.82))
    return [{"name": name, "settings": {"top_k": k}, "split": "val", "avg_normalized": avg,
             "normalized": {"a": avg, "b": avg, "c": avg}, "routing_accuracy": {"a": 0.8, "b": 0.6, "c": 0.9},
             "seconds_per_input": 0.004} for name, k, avg in variants]  # fmt: skip


def _router_row(name: str, routing: float, accuracy: dict[str, float], data: str = "none",
                **extra: Any) -> dict[str, Any]:
    normalized = {t: accuracy[t] / EXPERT[t] for t in accuracy}
    return {"name": name, "rule": "top-1 task, then that task's MASS model", "data": data,
            "routing_accuracy": {t: routing for t in TASKS}, "accuracy": accuracy, "normalized": normalized,
            "avg_accuracy": sum(accuracy.values()) / 3, "avg_normalized": sum(normalized.values()) / 3,
            "val_routing_accuracy": routing, **extra}  # fmt: skip


def routers_section() -> dict[str, Any]:
    """MASS, proj-PRE and two trained routers; the logistic one is the ceiling (best val accuracy)."""
    rows = [_router_row("MASS (ours)", 0.78, {"a": 0.8, "b": 0.5, "c": 0.9}),
            _router_row("proj-PRE", 0.7, {"a": 0.7, "b": 0.45, "c": 0.85}),
            _router_row("kNN on base embedding", 0.74, {"a": 0.75, "b": 0.5, "c": 0.88}, data="val inputs",
                        classifier="kNN", features="base embedding", setting=5.0),
            _router_row("logistic on all three", 0.8, {"a": 0.82, "b": 0.55, "c": 0.9}, data="val inputs",
                        classifier="logistic", features="all three", setting=0.01)]
    split = {t: {"task_given": 0.9, "task_hidden": 0.7, "lost": 0.25, "lost_by_best_router_too": 0.15,
                 "lost_only_without_data": 0.1} for t in TASKS}
    return {"rows": rows, "ceiling": "logistic on all three", "loss_split": split}


def scaling_points() -> list[dict[str, Any]]:
    """Two subsets at T = 2 and the one of T = 3, with MASS and TSV-M rows on each subset's tasks."""
    def point(tasks: list[str], mass: float, tsv: float) -> dict[str, Any]:
        rows = {"MASS": _row("task hidden", {t: mass * EXPERT[t] for t in tasks}),
                "tsv_m": _row("oracle head", {t: tsv * EXPERT[t] for t in tasks})}
        return {"T": len(tasks), "tasks": tasks, "rows": rows}

    return [point(["a", "b"], 0.95, 0.9), point(["a", "c"], 0.97, 0.88), point(["a", "b", "c"], 0.93, 0.8)]
