"""SMILE scored as the paper reports it and with the task hidden, with its storage and serving costs."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from massmerge.experiments.cache import EvalCache
from massmerge.experiments.pool import TaskPool
from massmerge.experiments.runner.rows import Params, row
from massmerge.experiments.runner.speed import forward_ratio
from massmerge.experiments.runner.static import score_static
from massmerge.smile import SmileSettings, build_smile, storage_factor


def smile_rows(pool: TaskPool, model: nn.Module, task_vectors: Callable[[], Sequence[Params]], cache: EvalCache,
               expert: Mapping[str, float], settings: SmileSettings, batch_size: int) -> dict[str, dict[str, Any]]:
    """SMILE with the oracle head (as the paper reports it) and with max-logit heads (task hidden), its storage
    over the base's and its serving throughput over a plain forward (:func:`forward_ratio`)."""
    name = f"SMILE-{settings.top_k}"

    def run() -> dict[str, Any]:
        start = time.perf_counter()
        smile = build_smile(model, task_vectors(), settings)
        seconds = time.perf_counter() - start
        scores = score_static(pool, smile, None, label=f"evaluate {name}")
        return {**scores, "merge_seconds": seconds, "storage_factor": storage_factor(smile, model),
                "serving_ratio": forward_ratio(pool, model, smile, batch_size)}

    result = cache.get_or_run("smile", run, settings)
    costs = {"storage_factor": result["storage_factor"], "serving_ratio": result["serving_ratio"]}
    return {name: row("oracle head", result["oracle"], expert, merge_seconds=result["merge_seconds"], **costs),
            f"{name} max-logit": row("task hidden", result["max_logit"], expert, **costs)}
