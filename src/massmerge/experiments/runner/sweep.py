"""The layer sweep: routing accuracy of every candidate routing matrix from one first pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from massmerge.experiments import metrics as ev
from massmerge.experiments.pool import TaskPool
from massmerge.mass import router
from massmerge.mass.model import MASSModel


@torch.inference_mode()
def routing_sweep(pool: TaskPool, mass: MASSModel, layers: Sequence[str], split: str = "test") -> list[dict[str, Any]]:
    """Top-1 routing accuracy and selection recall per candidate routing matrix, from one first pass.

    Every candidate's input is captured in a single first pass (its weights do not depend on the routing
    layer), pooled as the served model pools (the engine's own residuals), and routed by the paper's rule
    against that matrix's subspaces.
    """
    view = mass.with_settings(routing_layers=tuple(layers))
    s = mass.settings
    residuals: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    true = []
    for t, task in enumerate(pool.split(split)):
        for batch in task.batches():
            by_layer = view.layer_residuals(batch)
            for layer, res in by_layer.items():
                residuals[layer].append(res.cpu())
            true.append(torch.full((int(res.shape[0]),), t))
    true_t = torch.cat(true)
    rows = []
    for layer in layers:
        probs, selected = router.select(torch.cat(residuals[layer]), mode="topk", eta=s.eta, top_k=s.top_k, tau=s.tau)
        conf = ev.routing_confusion(true_t, probs.argmax(-1), pool.num_tasks)
        per_task = dict(zip(pool.names, ev.routing_accuracy_per_task(conf)))
        rows.append({"layer": layer, "routing_accuracy": per_task, "mean": ev.mean(per_task),
                     "selection_recall": ev.selection_recall(true_t, selected)})  # fmt: skip
    return rows
