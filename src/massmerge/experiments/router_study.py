"""The router study (issue 22): MASS's data-free router beside routers that use data, the identifiability
ceiling, and MASS's loss split by what the best router with data also loses.

How a router is scored: a hard router picks one task per test input, and the input is then answered by MASS's
second pass with that task alone (MASS with the task given, :func:`~massmerge.experiments.runner.
score_mass_task_given`). An input counts as right only when the pick is its true task *and* that model's
class is right, so its strict accuracy is ``mean(pick == task and task-given correct)``, exactly, from one
task-given pass shared by every router. MASS's own data-free router appears twice: as served (top-K set,
max-logit heads) and as a hard top-1 router scored like the others, so the comparison with the trained routers
is rule for rule. proj-PRE is MASS with its first pass through the pretrained weights, served as MASS.

Features a router may read, per input: the base model's final embedding, the first pass's input to the
(deepest) routing layer mean-pooled over the non-padding tokens (what MASS projects), and MASS's routing
log-posterior; and all three together. :mod:`.data_routers` trains the routers on val and picks the ceiling on
val (cross-validated), never on test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from massmerge.experiments import data_routers as dr
from massmerge.experiments import metrics as ev
from massmerge.experiments.cache import EvalCache, RouterStudyKey
from massmerge.experiments.pool import TaskPool
from massmerge.experiments.runner import ServedMASS, score_mass, split_features
from massmerge.mass.model import MASSModel

#: The rule of each kind of row, in the report's words.
HARD_RULE = "top-1 task, then that task's MASS model"
SERVED_RULE = "MASS serving: selected set, max-logit heads"
LOG_FLOOR = 1e-12


def task_ids(pool: TaskPool, split: str) -> torch.Tensor:
    """Each input's task index, in task order (the order every per-input list here uses)."""
    return torch.cat([torch.full((task.size,), t) for t, task in enumerate(pool.split(split))])


@torch.inference_mode()
def routing_features(pool: TaskPool, model: nn.Module, mass: MASSModel, split: str) -> dict[str, torch.Tensor]:
    """Per input of ``split`` (module doc): base embedding, first-pass activation, MASS log-posterior."""
    base = split_features(pool, model, None, split=split, label="router features (base)")
    layer = mass.settings.routing_layers[-1]
    activation, posterior = [], []
    for task in pool.split(split):
        for batch in task.batches():
            captured = mass.routing_activations(batch)[layer]
            activation.append(mass.pool(captured, mass.inputs(batch), "mean").float().cpu())
            posterior.append(mass.route(batch).probs.float().cpu().clamp_min(LOG_FLOOR).log())
    feats = {"base embedding": torch.cat([base[t] for t in range(pool.num_tasks)]),
             "first-pass activation": torch.cat(activation), "MASS log-posterior": torch.cat(posterior)}
    feats["all three"] = torch.cat([feats[name] for name in list(feats)], dim=1)
    return feats


def fit_routers(pool: TaskPool, model: nn.Module, mass: MASSModel) -> dict[str, Any]:
    """Every trained router's test picks (and val accuracy), and MASS's own top-1 picks on val and test."""
    feats = {split: routing_features(pool, model, mass, split) for split in ("val", "test")}
    sets = {name: {split: feats[split][name] for split in feats} for name in feats["val"]}
    rows = dr.router_predictions(sets, task_ids(pool, "val"), pool.num_tasks)
    top1 = {split: feats[split]["MASS log-posterior"].argmax(-1) for split in feats}
    return {"rows": rows, "mass_val_accuracy": float((top1["val"] == task_ids(pool, "val")).float().mean()),
            "mass_test_tasks": top1["test"].tolist()}


def per_task(pool: TaskPool, values: torch.Tensor) -> dict[str, float]:
    """Mean of a per-input 0/1 vector (task order) over each task's test inputs."""
    true = task_ids(pool, "test")
    return {name: float(values[true == t].float().mean()) for t, name in enumerate(pool.names)}


def hard_row(pool: TaskPool, name: str, picks: Sequence[int], given: torch.Tensor, expert: Mapping[str, float],
             **extra: Any) -> dict[str, Any]:
    """A hard router's row: test routing accuracy and strict accuracy through the task-given model."""
    true, picked = task_ids(pool, "test"), torch.tensor(list(picks))
    accuracy = per_task(pool, (picked == true) & given)
    normalized = ev.normalized_accuracy(accuracy, expert)
    return {"name": name, "rule": HARD_RULE, "routing_accuracy": per_task(pool, picked == true),
            "accuracy": accuracy, "normalized": normalized, "avg_accuracy": ev.mean(accuracy),
            "avg_normalized": ev.mean(normalized), **extra}


def served_row(name: str, result: Mapping[str, Any], expert: Mapping[str, float], val_accuracy: float,
               **extra: Any) -> dict[str, Any]:
    """A row of a served MASS view (:func:`~massmerge.experiments.runner.score_mass` output)."""
    normalized = ev.normalized_accuracy(result["max_logit"], expert)
    return {"name": name, "rule": SERVED_RULE, "routing_accuracy": result["routing_accuracy"],
            "accuracy": result["max_logit"], "normalized": normalized, "avg_accuracy": ev.mean(result["max_logit"]),
            "avg_normalized": ev.mean(normalized), "val_routing_accuracy": val_accuracy, **extra}


def loss_split(pool: TaskPool, given: torch.Tensor, hidden: torch.Tensor, best: torch.Tensor
               ) -> dict[str, dict[str, float]]:
    """Per task, shares of its test items: right with the task given, right with it hidden, and the items MASS
    loses (right given, wrong hidden) split into those the best data router loses too and those only the
    data-free router loses."""
    lost = given & ~hidden
    return {name: {"task_given": v_given, "task_hidden": v_hidden, "lost": v_lost, "lost_by_best_router_too": both,
                   "lost_only_without_data": only}
            for name, v_given, v_hidden, v_lost, both, only in zip(
                pool.names, per_task(pool, given).values(), per_task(pool, hidden).values(),
                per_task(pool, lost).values(), per_task(pool, lost & ~best).values(),
                per_task(pool, lost & best).values())}  # fmt: skip


def router_study(pool: TaskPool, model: nn.Module, served: ServedMASS, hidden: Mapping[str, Any],
                 given: Mapping[str, Any], cache: EvalCache, expert: Mapping[str, float]) -> dict[str, Any]:
    """The report's ``routers`` section: rows (data-free, proj-PRE, every trained router), the ceiling's name
    and MASS's loss split against it. ``hidden``/``given``: the served MASS's test scores with per-input
    correctness (:func:`~massmerge.experiments.runner.mass_scores`)."""
    mass = served.mass
    fitted = cache.get_or_run("router_study", lambda: fit_routers(pool, model, mass),
                              RouterStudyKey(mass=served.key(), routers=dr.settings()))
    given_t, hidden_t = torch.tensor(given["correct"], dtype=torch.bool), torch.tensor(hidden["correct"], dtype=torch.bool)
    pre = mass.with_settings(first_pass="pretrained")
    pre_scores = {split: cache.get_or_run(f"proj_pre-{split}", lambda s=split: score_mass(pool, pre, s, "proj-PRE"),
                                          served.key(pre)) for split in ("val", "test")}
    val_true = task_ids(pool, "val")
    pre_val = sum(pre_scores["val"]["routing_accuracy"][n] * int((val_true == t).sum())
                  for t, n in enumerate(pool.names)) / len(val_true)
    rows = [served_row("MASS (ours)", hidden, expert, fitted["mass_val_accuracy"], data="none"),
            hard_row(pool, "MASS router, top-1", fitted["mass_test_tasks"], given_t, expert, data="none",
                     val_routing_accuracy=fitted["mass_val_accuracy"]),
            served_row("proj-PRE", pre_scores["test"], expert, pre_val, data="none")]
    trained = fitted["rows"]
    for entry in trained:
        rows.append(hard_row(pool, f"{entry['classifier']} on {entry['features']}", entry["test_tasks"], given_t,
                             expert, data=entry["data"], classifier=entry["classifier"], features=entry["features"],
                             setting=entry["setting"], val_routing_accuracy=entry["val_accuracy"]))
    best = trained[dr.ceiling_of(trained)]
    picks = torch.tensor(best["test_tasks"])
    best_right = (picks == task_ids(pool, "test")) & given_t
    ceiling = f"{best['classifier']} on {best['features']}"
    return {"rows": rows, "ceiling": ceiling, "loss_split": loss_split(pool, given_t, hidden_t, best_right)}


__all__ = ["HARD_RULE", "SERVED_RULE", "fit_routers", "hard_row", "loss_split", "per_task", "router_study",
           "routing_features", "served_row", "task_ids"]
