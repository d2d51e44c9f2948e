"""The one experiment runner: every method scored the same way on a task pool, for ``suite`` and ``evaluate``.

Flow (one way): a task pool (:mod:`..pool`) and a base model -> zero-shot, each expert on its own task, every
static merge (oracle head and max-logit heads) -> MASS, assembled exactly as ``massmerge build`` stores it
(:func:`massmerge.mass.build.assemble`) and served as ``massmerge predict`` serves it
(:func:`massmerge.mass.serving.serve`) -> report rows normalized by the experts on the same split.

Static weights run through ``torch.func.functional_call`` on the one base module (nothing is copied into a
second model); MASS runs the engine its parts build. Every result is cached under a key of everything that
shaped it (:class:`~massmerge.experiments.cache.EvalCache`), so an interrupted run resumes where it stopped.

One module per job; this package re-exports them so callers write ``runner.score_mass`` as before:
:mod:`.rows` (the report row), :mod:`.static` (zero-shot, experts, static merges, TSV-C), :mod:`.served` (MASS
served: task hidden, task given, batch routing), :mod:`.sweep` (the layer sweep), :mod:`.ablation` (the router
variants), :mod:`.frontier` (routing block x restart block), :mod:`.speed` (throughput), :mod:`.smile_scores`.
"""

from __future__ import annotations

from massmerge.experiments.runner.ablation import ablation_rows, router_variants
from massmerge.experiments.runner.frontier import frontier_rows
from massmerge.experiments.runner.rows import Params, row
from massmerge.experiments.runner.served import (
    ORACLE_CHUNK,
    ServedMASS,
    batch_routing_row,
    mass_rows,
    mass_scores,
    score_mass,
    score_mass_batch_routing,
    score_mass_task_given,
    serve_parts,
)
from massmerge.experiments.runner.smile_scores import smile_rows
from massmerge.experiments.runner.speed import forward_ratio, forward_runner, mixed_inputs, throughput
from massmerge.experiments.runner.static import (
    placement,
    score_experts,
    score_features,
    score_static,
    split_features,
    static_rows,
    tsv_c_accuracy,
)
from massmerge.experiments.runner.sweep import routing_sweep

__all__ = ["ORACLE_CHUNK", "Params", "ServedMASS", "ablation_rows", "batch_routing_row", "forward_ratio",
           "forward_runner", "frontier_rows", "mass_rows", "mass_scores", "mixed_inputs", "placement",
           "router_variants", "routing_sweep", "row", "score_experts", "score_features", "score_mass",
           "score_mass_batch_routing", "score_mass_task_given", "score_static", "serve_parts", "smile_rows",
           "split_features", "static_rows", "throughput", "tsv_c_accuracy"]
