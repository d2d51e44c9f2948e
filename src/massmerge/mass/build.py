"""From experts to the parts of a served MASS model, exactly as ``massmerge build`` stores them.

The one path from task vectors (or precomputed factors, e.g. of LoRA experts) to what is served: factorize the
experts one at a time, cut every task's rank to the size budget and round the factors to their storage dtype
(:func:`~massmerge.mass.budget.stored_factors`), and fix the serve settings of the family's default router.
``massmerge build`` writes these parts as an artifact; ``massmerge evaluate`` and the suite serve them in memory.
So what is scored is what is shipped: the same factors bit for bit, the same ranks, the same router.

The family's facts (its default router, exiting at the routing layer) come in as plain settings, so this module
knows no model family (the adapters sit above the engine).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from massmerge.mass.budget import stored_factors, tensor_bytes
from massmerge.mass.config import BuildSettings, ServeSettings, make_serve_settings
from massmerge.mass.experts import ExpertFactors, indistinct_note
from massmerge.mass.model import FeatureFn, MASSModel, check_parts, default_features
from massmerge.mass.pooling import PoolFn, identity_pool
from massmerge.mass.storage import factor_storage, float_dtype


@dataclass
class MASSParts:
    """What a MASS artifact holds besides the base: stored factors, heads, build and serve settings."""

    factors: ExpertFactors  # cut to the budget and rounded to ``store``: exactly what the artifact holds
    heads: list[nn.Module]
    build: BuildSettings
    serve: ServeSettings
    store: torch.dtype  # the factors' storage dtype
    rank_scale: float  # the common fraction of every rank kept to fit the budget (1.0: design ranks)
    size_factor: float  # the artifact's size in base sizes, as estimated by the budget
    design_rank: int  # the sum of every task's design rank over every matrix, before the cut
    note: str | None = None  # why the design ranks were kept above the default budget, if they were
    expert_note: str | None = None  # experts the router cannot tell apart (all-zero or identical), if any

    def model(self, base_model: nn.Module, *, settings: ServeSettings | None = None, pool: PoolFn = identity_pool,
              features: FeatureFn = default_features, **options: Any) -> MASSModel:
        """The served engine over these parts (what ``load()`` of the written artifact gives), with the parts'
        serve settings or ``settings``; ``options`` go to :class:`~massmerge.mass.MASSModel`."""
        return MASSModel(base_model, self.factors, self.heads, settings or self.serve, pool=pool, features=features,
                         **options)


def total_rank(factors: ExpertFactors) -> int:
    """The sum of every task's rank over every matrix (what the size budget cuts)."""
    return sum(f.rank for per_task in factors.matrices.values() for f in per_task)


def assemble(base_model: nn.Module, experts: Iterable[Mapping[str, torch.Tensor]] | ExpertFactors,
             task_names: Sequence[str], heads: Sequence[nn.Module], *, build: BuildSettings,
             router: Mapping[str, Any], header_bytes: Callable[[ExpertFactors], int], max_length: int | None = None,
             dtype: str | None = None, device: torch.device | str | None = None) -> MASSParts:
    """The parts of the MASS model of ``experts`` over ``base_model``.

    ``experts``: task vectors (each read once, one expert at a time) or factors built already (LoRA); ``router``:
    the family's default router as serve-setting values (``adapter.default_router(model)``), its routing layers
    kept where the experts have factors (a filtered-out layer cannot route); ``max_length``: the text length the
    experts were trained with, and ``dtype``, the serving precision, recorded as serve defaults; ``header_bytes``:
    the artifact's header bytes of given factors, counted in the size budget (the artifact layer's
    ``factor_header_bytes``: this layer knows no file format); ``device``: where
    the SVDs run (the factors are kept
    on the CPU, so device memory holds one matrix at a time). The base's bytes (the budget's denominator) are its
    tensors' bytes. Checks the parts as the served model will (:func:`~massmerge.mass.model.check_parts`).
    """
    state = base_model.state_dict()
    if isinstance(experts, ExpertFactors):
        factors = experts
    else:
        factors = ExpertFactors.build(experts, task_names, rank_fraction=build.rank_fraction, eps=build.eps,
                                      svd=build.svd, device=device)
    store = factor_storage(build.factor_dtype, float_dtype(state))
    design_rank, expert_note = total_rank(factors), indistinct_note(factors)
    stored = stored_factors(factors, list(heads), tensor_bytes(state.values()), store, build.max_size,
                            header_bytes=header_bytes(factors))  # consumes ``factors``
    layers = tuple(router["routing_layers"])
    kept = tuple(name for name in layers if f"{name}.weight" in stored.factors.matrices)
    serve = make_serve_settings(**{**router, "routing_layers": kept or layers[-1:]}, max_length=max_length, dtype=dtype)
    check_parts(base_model, stored.factors, list(heads), serve)
    return MASSParts(stored.factors, list(heads), build, serve, store, stored.rank_scale, stored.size_factor,
                     design_rank, stored.note, expert_note)


__all__ = ["MASSParts", "assemble", "total_rank"]
