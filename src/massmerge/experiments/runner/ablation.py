"""The router ablation (issue 9): its table of serve-setting variants and their rows on val and test."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from massmerge.experiments import metrics as ev
from massmerge.experiments.cache import EvalCache
from massmerge.experiments.pool import TaskPool
from massmerge.experiments.runner.served import ServedMASS, score_mass
from massmerge.mass.config import ROUTER_PROFILES


def router_variants(adapter: Any, model: nn.Module, layer: str) -> dict[str, dict[str, Any]]:
    """Serve-setting variants of the router ablation (issue 9): the paper's rule, each data-free change alone,
    and all of them together (the text family's default router, ``TextEncoderAdapter.default_router``).

    Multi-layer routing uses every linear layer the first pass computes before it stops at ``layer``
    (``evidence_layers``), so it costs no extra forward; ``ppca`` adds the layers' log-likelihoods and, being
    sharp, selects one task almost always.
    """
    paper = {**ROUTER_PROFILES["paper"], "routing_layers": (layer,), "pooling": adapter.paper_pooling}
    several = adapter.evidence_layers(model, layer)
    return {
        "paper": paper,
        "content pooling": {**paper, "pooling": "content"},
        "token residuals": {**paper, "pooling": "tokens"},
        "multi-layer (standardized)": {**paper, "routing_layers": several},
        "ppca, one layer": {**paper, "layer_combine": "ppca"},
        "multi-layer (ppca)": {**paper, "routing_layers": several, "layer_combine": "ppca"},
        "posterior head": {**paper, "head_rule": "posterior"},
        "joint head": {**paper, "head_rule": "joint"},
        "all: content + multi-layer ppca": {**paper, "pooling": "content", "routing_layers": several,
                                            "layer_combine": "ppca"},
        "token residuals + multi-layer ppca": {**paper, "pooling": "tokens", "routing_layers": several,
                                               "layer_combine": "ppca"},
    }


def ablation_rows(pool: TaskPool, served: ServedMASS, variants: Mapping[str, Mapping[str, Any]], cache: EvalCache,
                  expert: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """Every router variant on the validation split (where defaults are chosen) and the test split."""
    rows = []
    for name, overrides in variants.items():
        view = served.mass.with_settings(**overrides)
        for split in ("val", "test"):
            result = cache.get_or_run(f"ablation-{split}", lambda v=view, s=split, n=name: score_mass(pool, v, s, n),
                                      served.key(view))
            normalized = ev.normalized_accuracy(result["max_logit"], expert[split])
            rows.append({"name": name, "settings": {k: overrides[k] for k in sorted(overrides)}, "split": split,
                         "accuracy": result["max_logit"], "normalized": normalized,
                         "avg_normalized": ev.mean(normalized), "routing_accuracy": result["routing_accuracy"],
                         "seconds_per_input": result["seconds_per_input"]})
    return rows
