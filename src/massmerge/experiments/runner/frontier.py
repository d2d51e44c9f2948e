"""The cost/accuracy frontier (issue 21): routing block by restart block, accuracy and throughput."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from massmerge.experiments import metrics as ev
from massmerge.experiments.cache import EvalCache
from massmerge.experiments.pool import TaskPool
from massmerge.experiments.runner.served import ServedMASS, score_mass
from massmerge.experiments.runner.speed import throughput


def frontier_rows(pool: TaskPool, model: nn.Module, served: ServedMASS, adapter: Any, blocks: Sequence[int],
                  cache: EvalCache, expert: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """The cost/accuracy frontier of issue 21: for each routing block l (the family's router exiting at block
    l's routing matrix) and each restart block j from 0 to l, normalized accuracy with the task hidden on the
    validation and test splits, and throughput against a plain forward measured in the same run. Costs in
    forwards: about ``(l + 1 + L - j) / L`` (the first pass runs into block l; ``j = 0`` recomputes all)."""
    depth = len(adapter.block_names(model))
    multi = len(served.mass.settings.routing_layers) > 1
    rows = []
    for block in blocks:
        layer = adapter.block_routing_layer(model, block)
        layers = adapter.evidence_layers(model, layer) if multi else (layer,)
        for restart in range(block + 1):
            view = served.mass.with_settings(routing_layers=layers, restart_block=restart)
            found: dict[str, Any] = {"routing_layer": layer, "routing_block": block, "restart_block": restart,
                                     "cost": (block + 1 + depth - restart) / depth}
            for split in ("val", "test"):
                result = cache.get_or_run(f"frontier-{split}", lambda v=view, s=split: score_mass(pool, v, s, "MASS"),
                                          served.key(view))
                normalized = ev.normalized_accuracy(result["max_logit"], expert[split])
                found[split] = {"avg_normalized": ev.mean(normalized), "normalized": normalized,
                                "accuracy": result["max_logit"]}
            found["throughput"] = throughput(pool, model, view)["ratio"]
            rows.append(found)
    return rows
