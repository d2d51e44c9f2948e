"""MASS: MoErging through Adaptive Subspace Selection (per-task factors, data-free router, two-pass model).

Names are imported lazily (PEP 562), so ``massmerge.mass.config`` can be read without importing torch: the
command line reads its defaults from there and must start fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BuildSettings": "massmerge.mass.config",
    "ServeSettings": "massmerge.mass.config",
    "make_build_settings": "massmerge.mass.config",
    "make_serve_settings": "massmerge.mass.config",
    "ExpertFactors": "massmerge.mass.experts",
    "MASSModel": "massmerge.mass.model",
    "MASSOutput": "massmerge.mass.model",
    "identity_pool": "massmerge.mass.pooling",
    "mean_pool": "massmerge.mass.pooling",
    "token_pool": "massmerge.mass.pooling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'massmerge.mass' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
