"""Evaluation results cached on disk under a hash of everything that shaped them.

Why: a benchmark run takes minutes to hours and may be interrupted; every finished score (a method on every
task, an ablation row) is written atomically as it completes, so a rerun with the same inputs and settings skips
it, and a changed setting (rank fraction, task list, alpha, router, ...) misses the cache instead of reusing a
stale result (design.md section 4: caches keyed by every setting).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from massmerge.io.atomic import write_text_atomically


def stable_hash(payload: Any) -> str:
    """A short hex digest of a JSON-able payload (keys sorted, so equal settings give equal keys)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


class EvalCache:
    """JSON results under ``root/evals``, keyed by the run's ``base_key``, the result's name and its settings."""

    def __init__(self, root: Path, base_key: str) -> None:
        self.root, self.base_key = Path(root) / "evals", base_key

    def get_or_run(self, name: str, fn: Callable[[], dict[str, Any]], **settings: Any) -> dict[str, Any]:
        """The cached result of ``name`` under ``settings``, or ``fn()`` computed now and cached."""
        path = self.root / f"{name}-{stable_hash([self.base_key, name, settings])}.json"
        if path.exists():
            return json.loads(path.read_text())
        result = fn()
        write_text_atomically(path, json.dumps(result))
        return result


__all__ = ["EvalCache", "stable_hash"]
