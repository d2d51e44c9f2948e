"""Evaluation results cached on disk under a key of everything that shaped them.

Why: a benchmark run takes minutes to hours and may be interrupted; every finished score (a method on every
task, an ablation row) is written atomically as it completes, so a rerun with the same inputs and settings skips
it, and a changed setting (rank fraction, task list, alpha, router, ...) misses the cache instead of reusing a
stale result (design.md section 4: caches keyed by every setting).

Keys are frozen value objects (:class:`CacheKey`, pydantic models), hashed from every field they declare, never
strings assembled by hand: a new setting is a new field, and it enters the key by being declared. A result's
name and the revision of the code that computes it are fields too (:class:`ResultKey`), not name suffixes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from massmerge.io.atomic import write_text_atomically
from massmerge.mass.config import ServeSettings

DIGEST_CHARS = 20  # hex characters of a key's digest in file names (80 bits)


def digest_of(value: BaseModel) -> str:
    """A short hex digest of every field of ``value`` (JSON, keys sorted; a None field counts as unset)."""
    fields = {name: field for name, field in value.model_dump(mode="json").items() if field is not None}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:DIGEST_CHARS]


class CacheKey(BaseModel):
    """A frozen value object that names something cached: two keys are equal, and have equal digests, exactly
    when every field is equal."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def digest(self) -> str:
        """The key's digest (:func:`digest_of`): what file names carry."""
        return digest_of(self)


class ResultKey(CacheKey):
    """One cached result: the run it belongs to, its name, the revision of the code that computes it (raise it
    when a change makes earlier results wrong) and the settings that shaped it (a frozen pydantic model)."""

    run: str
    name: str
    revision: int = 1
    settings_kind: str | None = None
    settings: dict[str, Any] | None = None

    @classmethod
    def of(cls, run: str, name: str, settings: BaseModel | None = None, revision: int = 1) -> ResultKey:
        """The key of result ``name`` under ``settings`` (every field of it, and its kind, enter the key)."""
        if settings is None:
            return cls(run=run, name=name, revision=revision)
        return cls(run=run, name=name, revision=revision, settings_kind=type(settings).__name__,
                   settings=settings.model_dump(mode="json"))


class BuildKey(CacheKey):
    """What served factors depend on beyond the experts: de-redundancy, the budget's rank cut, storage dtype."""

    eps: float | None
    rank_scale: float
    factor_dtype: str


class MassKey(CacheKey):
    """A served MASS view: its factors (:class:`BuildKey`) and every serve setting."""

    build: BuildKey
    serve: ServeSettings


class TaskGivenKey(CacheKey):
    """MASS with the true task given: routing plays no part, so only the factors and alpha shape it."""

    build: BuildKey
    alpha: float


class MergeKey(CacheKey):
    """A static merge's options (the method is the result's name)."""

    options: dict[str, Any] = {}


class RouterStudyKey(CacheKey):
    """The router study: the served MASS view and every constant of the trained routers."""

    mass: MassKey
    routers: dict[str, Any]


class EvalCache:
    """JSON results under ``root/evals``, keyed by the run's key, the result's name, revision and settings."""

    def __init__(self, root: Path, run: CacheKey) -> None:
        self.root, self.run = Path(root) / "evals", run.digest()

    def path(self, name: str, settings: BaseModel | None = None, revision: int = 1) -> Path:
        """Where result ``name`` under ``settings`` is (or would be) cached."""
        return self.root / f"{name}-{ResultKey.of(self.run, name, settings, revision).digest()}.json"

    def get_or_run(self, name: str, fn: Callable[[], dict[str, Any]], settings: BaseModel | None = None, *,
                   revision: int = 1) -> dict[str, Any]:
        """The cached result of ``name`` under ``settings``, or ``fn()`` computed now and cached."""
        path = self.path(name, settings, revision)
        if path.exists():
            return json.loads(path.read_text())
        result = fn()
        write_text_atomically(path, json.dumps(result))
        return result


__all__ = [
    "DIGEST_CHARS",
    "BuildKey",
    "CacheKey",
    "EvalCache",
    "MassKey",
    "MergeKey",
    "ResultKey",
    "RouterStudyKey",
    "TaskGivenKey",
    "digest_of",
]
