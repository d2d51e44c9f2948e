"""Static weights scored on a task pool: zero-shot, each expert on its own task, every static merge, TSV-C.

Static weights run through ``torch.func.functional_call`` on the one base module (nothing is copied into a
second model)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from massmerge import progress
from massmerge.device import to_device
from massmerge.experiments import metrics as ev
from massmerge.experiments.cache import EvalCache, MergeKey
from massmerge.experiments.pool import TaskPool
from massmerge.experiments.runner.rows import Params, row
from massmerge.mass.model import FeatureRunner
from massmerge.merging import merge


@torch.inference_mode()
def split_features(pool: TaskPool, model: nn.Module, params: Params | None, which: Sequence[int] | None = None,
                   *, split: str = "test", label: str = "evaluate") -> dict[int, torch.Tensor]:
    """Final features of the splits of tasks ``which`` (default all) under ``params`` (None: the base's own)."""
    runner = FeatureRunner(model, pool.features)
    device, dtype = placement(model)
    swapped = {f"model.{key}": value.to(device=device, dtype=dtype if value.is_floating_point() else None)
               for key, value in (params or {}).items()}
    tasks = pool.split(split)
    which = list(range(pool.num_tasks)) if which is None else list(which)
    out: dict[int, list[torch.Tensor]] = {t: [] for t in which}
    for t in which:  # one progress stage per task: a long evaluation shows where it is
        for batch in progress.track(tasks[t].batches(), f"{label} {pool.names[t]}"):
            features = functional_call(runner, swapped, (to_device(batch, device, dtype),), strict=False)
            out[t].append(features.float().cpu())
    return {t: torch.cat(parts) for t, parts in out.items()}


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a model's floating parameters: where its inputs and swapped weights must go."""
    floating = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (floating.device, floating.dtype) if floating is not None else (torch.device("cpu"), torch.float32)


def score_features(pool: TaskPool, feats: Mapping[int, torch.Tensor], *, split: str = "test",
                   max_logit: bool = True) -> dict[str, Any]:
    """Per task: oracle-head accuracy and (when every task's features are there) max-logit accuracy."""
    names, tasks = pool.names, pool.split(split)
    out: dict[str, Any] = {"oracle": {names[t]: ev.oracle_head_accuracy(f, pool.heads[t], tasks[t].labels)
                                      for t, f in feats.items()}}
    if max_logit:
        out["max_logit"] = {names[t]: ev.max_logit_accuracy(f, pool.heads, t, tasks[t].labels)
                            for t, f in feats.items()}
    return out


def score_static(pool: TaskPool, model: nn.Module, params: Params | None, *, label: str) -> dict[str, Any]:
    """Oracle-head and max-logit (task hidden) accuracy of one set of weights on every task's test split."""
    return score_features(pool, split_features(pool, model, params, label=label))


def score_experts(pool: TaskPool, model: nn.Module, expert_params: Callable[[int], Params]) -> dict[str, Any]:
    """Each expert on its own task with its own head: the normalizers, on the test split and (when the pool has
    one) the validation split."""
    oracle, val = {}, {}
    for t, name in enumerate(pool.names):
        params = expert_params(t)
        feats = split_features(pool, model, params, [t], label="expert")
        oracle.update(score_features(pool, feats, max_logit=False)["oracle"])
        if "val" in pool.splits:
            val_feats = split_features(pool, model, params, [t], split="val", label="expert (val)")
            val.update(score_features(pool, val_feats, split="val", max_logit=False)["oracle"])
    return {"oracle": oracle, "val": val}


def static_rows(pool: TaskPool, model: nn.Module, base: Params, task_vectors: Callable[[], Sequence[Params]],
                methods: Sequence[str], cache: EvalCache, expert: Mapping[str, float],
                options: Callable[[str], dict[str, Any]] = lambda method: {}) -> dict[str, dict[str, Any]]:
    """Every static merge with the oracle head (``name``) and max-logit heads (``name max-logit``)."""
    rows: dict[str, dict[str, Any]] = {}
    for name in methods:
        opts = options(name)

        def run(name: str = name, opts: dict[str, Any] = opts) -> dict[str, Any]:
            start = time.perf_counter()
            state = merge(name, base, task_vectors(), **opts)
            seconds = time.perf_counter() - start
            return {**score_static(pool, model, state, label=f"evaluate {name}"), "merge_seconds": seconds}

        result = cache.get_or_run(name, run, MergeKey(options=opts))
        extra = {"options": opts} if opts else {}
        rows[name] = row("oracle head", result["oracle"], expert, merge_seconds=result["merge_seconds"],
                         storage_factor=1.0, **extra)  # fmt: skip
        rows[f"{name} max-logit"] = row("task hidden", result["max_logit"], expert, storage_factor=1.0)
    return rows


def tsv_c_accuracy(pool: TaskPool, model: nn.Module, base: Params, task_vectors: Callable[[], Sequence[Params]],
                   cache: EvalCache) -> dict[str, float]:
    """TSV-C: each task's rank-k reconstruction with the task known (the oracle compression bound)."""

    def run() -> dict[str, Any]:
        oracle: dict[str, float] = {}
        for t, name in enumerate(pool.names):
            feats = split_features(pool, model, merge("tsv_c", base, task_vectors(), task=t), [t],
                                   label="evaluate tsv_c")
            oracle.update(score_features(pool, feats, max_logit=False)["oracle"])
        return {"oracle": oracle}

    return cache.get_or_run("tsv_c", run)["oracle"]
