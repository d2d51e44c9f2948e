"""Static merges behind one registry and one signature: ``merge(base, task_vectors, **opts) -> state dict``.

The registry lives in :mod:`massmerge.merging.registry` and the names and defaults in
:mod:`massmerge.merging.names`; both are imported lazily (PEP 562), so reading the method names does not import
torch (the command line must start fast).
"""

from __future__ import annotations

from massmerge.lazy import lazy_getattr

_EXPORTS = {
    "MERGE_METHODS": "massmerge.merging.registry",
    "get_merge_method": "massmerge.merging.registry",
    "merge": "massmerge.merging.registry",
    "method_options": "massmerge.merging.registry",
    "METHOD_NAMES": "massmerge.merging.names",
    "STATIC_MERGES": "massmerge.merging.names",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
