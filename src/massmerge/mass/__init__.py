"""MASS: MoErging through Adaptive Subspace Selection (per-task factors, data-free router, two-pass model).

Names are imported lazily (PEP 562), so ``massmerge.mass.config`` can be read without importing torch: the
command line reads its defaults from there and must start fast.
"""

from __future__ import annotations

from massmerge.lazy import lazy_getattr

_EXPORTS = {
    "BuildSettings": "massmerge.mass.config",
    "ServeSettings": "massmerge.mass.config",
    "make_build_settings": "massmerge.mass.config",
    "make_serve_settings": "massmerge.mass.config",
    "ExpertFactors": "massmerge.mass.experts",
    "MASSModel": "massmerge.mass.model",
    "MASSOutput": "massmerge.mass.model",
    "TaskSets": "massmerge.mass.seam",
    "identity_pool": "massmerge.mass.pooling",
    "mean_pool": "massmerge.mass.pooling",
    "token_pool": "massmerge.mass.pooling",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
