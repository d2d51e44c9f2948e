"""MASS as ``massmerge predict`` serves it, scored on a task pool: task hidden, task given, batch routing, its rows."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from massmerge import progress
from massmerge.experiments import metrics as ev
from massmerge.experiments.cache import BuildKey, EvalCache, MassKey, TaskGivenKey
from massmerge.experiments.pool import TaskPool
from massmerge.experiments.runner.rows import row
from massmerge.mass.build import MASSParts
from massmerge.mass.model import MASSModel
from massmerge.mass.serving import serve
from massmerge.mass.storage import dtype_name, float_dtype

ORACLE_CHUNK = 1024  # predictions whose routed features are read by their heads at once (score_mass)


@dataclass
class ServedMASS:
    """The MASS model an experiment scores, and what its stored factors cost."""

    mass: MASSModel
    storage: dict[str, Any]  # base_numel, factor_numel, base_dtype, factor_dtype, bytes_ratio, rank_scale
    build_key: BuildKey  # what the factors depend on beyond the experts (cache keys)
    factor_seconds: float

    def key(self, view: MASSModel | None = None) -> MassKey:
        """The cache key of a view of the served model (default: the model itself)."""
        return MassKey(build=self.build_key, serve=(view or self.mass).settings)


def serve_parts(model: nn.Module, parts: MASSParts, mass: MASSModel, factor_seconds: float) -> ServedMASS:
    """The served model of assembled parts with its storage figures (the artifact ``build`` would write)."""
    state = model.state_dict()
    base_numel = sum(v.numel() for v in state.values() if v.is_floating_point())
    storage = {"base_numel": base_numel, "factor_numel": parts.factors.numel(),
               "base_dtype": dtype_name(float_dtype(state)), "factor_dtype": dtype_name(parts.store),
               "bytes_ratio": parts.size_factor, "rank_scale": parts.rank_scale}
    build_key = BuildKey(eps=parts.build.eps, rank_scale=parts.rank_scale, factor_dtype=storage["factor_dtype"])
    return ServedMASS(mass, storage, build_key, factor_seconds)


def _served_items(pool: TaskPool, split: str) -> tuple[Iterator[Any], torch.Tensor, torch.Tensor]:
    """Every task's items in task order as ONE lazy stream (never a list: a real test set is tens of GiB once
    preprocessed), with each item's true task and label."""
    tasks = pool.split(split)
    items = (item for task in tasks for item in task.items())
    true = torch.cat([torch.full((task.size,), t) for t, task in enumerate(tasks)])
    return items, true, torch.cat([task.labels for task in tasks])


def _collect(predictions: Iterable[Any], heads: Sequence[nn.Module], true: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(task, label, probs, selected, oracle-head label) of a prediction stream, a window at a time: each
    input's routed features are read by its true task's head as they come and then dropped, so nothing kept
    grows with the feature width."""
    task, label, probs, selected, oracle = [], [], [], [], []
    window: list[Any] = []

    def flush() -> None:
        features = torch.stack([p.features for p in window])
        rows = torch.tensor([p.index for p in window])
        owner = true[rows]
        guess = torch.empty(len(window), dtype=torch.long)
        for t in owner.unique().tolist():
            mask = owner == t
            guess[mask] = ev.logits(heads[t], features[mask]).argmax(-1).cpu()
        oracle.append(guess)
        window.clear()

    for p in predictions:
        task.append(p.task)
        label.append(p.label)
        probs.append(p.probs)
        selected.append(p.selected)
        window.append(p)
        if len(window) == ORACLE_CHUNK:
            flush()
    if window:
        flush()
    return (torch.tensor(task), torch.tensor(label), torch.stack(probs).cpu(), torch.stack(selected).cpu(),
            torch.cat(oracle))


@torch.inference_mode()
def score_mass(pool: TaskPool, mass: MASSModel, split: str = "test", label: str = "MASS") -> dict[str, Any]:
    """MASS with the task hidden, served as ``massmerge predict`` serves (every task's items in one stream):
    strict (task, class) accuracy and where it loses.

    Per task: routing top-1, the true task among the selected (``selection_recall``), the final task choice,
    the class given the right task, the true task's head on the routed features (``oracle_head``), the routing
    confusion, and the wall time per input of the whole served call.
    """
    names, T = pool.names, pool.num_tasks
    items, true, labels = _served_items(pool, split)
    start = time.perf_counter()
    stream = progress.track(serve(mass, items, pool.collate, batch_size=mass.settings.batch_size,
                                  size_of=pool.size_of, return_features=True), f"{label} ({split})", total=len(true))
    task, label_pred, probs, selected, oracle = _collect(stream, pool.heads, true)
    seconds = time.perf_counter() - start
    right_task, top1 = task == true, probs.argmax(-1)
    correct = right_task & (label_pred == labels)
    chosen_true = selected[torch.arange(len(true)), true]

    def per_task(values: torch.Tensor, over: torch.Tensor | None = None) -> dict[str, float]:
        out = {}
        for t in range(T):
            mask = (true == t) if over is None else (true == t) & over
            out[names[t]] = float(values[mask].float().mean()) if bool(mask.any()) else 0.0
        return out

    confusion = ev.routing_confusion(true, top1, T)
    return {
        "max_logit": per_task(correct), "oracle_head": per_task(oracle == labels),
        "routing_accuracy": per_task(top1 == true), "selection_recall": per_task(chosen_true),
        "task_choice": per_task(right_task), "class_given_task": per_task(label_pred == labels, right_task),
        "confusion": confusion.tolist(), "mean_selected": float(selected.sum(1).float().mean()),
        "task_sets": len({tuple(r.nonzero().flatten().tolist()) for r in selected}),
        "seconds_per_input": seconds / len(true), "correct": correct.int().tolist(),
    }


@torch.inference_mode()
def score_mass_task_given(pool: TaskPool, mass: MASSModel, split: str = "test") -> dict[str, Any]:
    """MASS's second pass with the true task as the only selected task (routing made perfect); ``correct``:
    per input, in task order (the order :func:`score_mass` serves them)."""
    oracle, correct = {}, []
    for t, (name, task) in enumerate(zip(pool.names, pool.split(split))):
        right = []
        for batch in progress.track(task.batches(), f"MASS task given {name}"):
            out = mass(batch, task=t)
            start = sum(len(r) for r in right)
            right.append(out.label.cpu() == task.labels[start:start + len(out.label)])
        hits = torch.cat(right)
        oracle[name] = float(hits.float().mean())
        correct += hits.int().tolist()
    return {"oracle": oracle, "correct": correct}


@torch.inference_mode()
def score_mass_batch_routing(pool: TaskPool, mass: MASSModel, split: str = "test") -> dict[str, Any]:
    """The paper's batch routing: each batch holds one task's inputs and is routed once (``mode="batch"``:
    residuals averaged over the batch, one task set for all of it); strict (task, class) accuracy per task."""
    view = mass.with_settings(mode="batch")
    accuracy = {}
    for t, (name, task) in enumerate(zip(pool.names, pool.split(split))):
        correct, start = 0, 0
        for batch in progress.track(task.batches(), f"MASS batch routing {name}"):
            out = view(batch)
            labels = task.labels[start:start + len(out.label)]
            correct += int(((out.task.cpu() == t) & (out.label.cpu() == labels)).sum())
            start += len(out.label)
        accuracy[name] = correct / task.size
    return {"accuracy": accuracy, "batch_size": view.settings.batch_size}


def mass_scores(pool: TaskPool, served: ServedMASS, mass: MASSModel, cache: EvalCache
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(task hidden, task given) test scores of a MASS view, with their per-input correctness, cached."""
    hidden = cache.get_or_run("mass", lambda: score_mass(pool, mass), served.key(mass))
    given = cache.get_or_run("mass_task_given", lambda: score_mass_task_given(pool, mass),
                             TaskGivenKey(build=served.build_key, alpha=mass.settings.alpha))
    return hidden, given


def batch_routing_row(pool: TaskPool, served: ServedMASS, cache: EvalCache, expert: Mapping[str, float]
                      ) -> dict[str, Any]:
    """The paper's batch-routing row: one routing per single-task batch (:func:`score_mass_batch_routing`)."""
    result = cache.get_or_run("mass_batch_routing", lambda: score_mass_batch_routing(pool, served.mass), served.key())
    return row("batch routing", result["accuracy"], expert, storage_factor=served.storage["bytes_ratio"],
               batch_size=result["batch_size"])


def mass_rows(pool: TaskPool, served: ServedMASS, mass: MASSModel, cache: EvalCache, expert: Mapping[str, float],
              suffix: str = "") -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The MASS rows (task given, oracle head on routed features, task hidden) and the routing details."""
    hidden, given = mass_scores(pool, served, mass, cache)
    storage = served.storage["bytes_ratio"]
    rows = {
        f"MASS (task given){suffix}": row("oracle routing", given["oracle"], expert, storage_factor=storage),
        f"MASS oracle-head{suffix}": row("oracle head", hidden["oracle_head"], expert, storage_factor=storage),
        f"MASS{suffix}": row("task hidden", hidden["max_logit"], expert, storage_factor=storage),
    }
    keys = ("routing_accuracy", "selection_recall", "task_choice", "class_given_task", "confusion",
            "mean_selected", "task_sets")
    return rows, {"layer": mass.settings.routing_layers[-1], **{k: hidden[k] for k in keys}}
