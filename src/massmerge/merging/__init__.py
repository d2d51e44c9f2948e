"""Static merges behind one registry and one signature: ``merge(base, task_vectors, **opts) -> state dict``.

Each method lives in its own module as a pure function over tensors; this registry maps the public method
names (the CLI's ``--method``) to them and checks option names, so a typo is an error, not a silent default.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from massmerge.errors import CheckpointError, OptionError
from massmerge.merging import iso_c, iso_cts, task_arithmetic, ties, tsv_c, tsv_m, weight_average
from massmerge.merging.common import StateDict, TaskVectors

MergeFn = Callable[..., StateDict]

MERGE_METHODS: dict[str, MergeFn] = {
    "weight_average": weight_average.merge,
    "task_arithmetic": task_arithmetic.merge,
    "ties": ties.merge,
    "tsv_m": tsv_m.merge,
    "tsv_c": tsv_c.merge,
    "iso_c": iso_c.merge,
    "iso_cts": iso_cts.merge,
}

# Methods that produce one model for all tasks (tsv_c needs the task, so it is not a merge in that sense).
STATIC_MERGES = ("weight_average", "task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts")


def get_merge_method(name: str) -> MergeFn:
    """The merge function registered under ``name``; unknown names list the valid ones."""
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise OptionError(f"--method '{name}' is unknown; choose one of {', '.join(MERGE_METHODS)}") from None


def method_options(name: str) -> list[str]:
    """Keyword options accepted by a method (for help texts and option checks)."""
    params = inspect.signature(get_merge_method(name)).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


class CheckedTaskVector(Mapping[str, torch.Tensor]):
    """A task vector whose tensors are checked as a method reads them: the base's shape and finite values.

    Why: the methods are pure math; without this a NaN expert gives NaN weights (or a raw linalg error) and a
    wrong shape a raw RuntimeError. The check costs one pass over each tensor read, small beside the SVDs.
    """

    def __init__(self, task_vector: Mapping[str, torch.Tensor], index: int, base: Mapping[str, torch.Tensor]) -> None:
        self._tv, self._index, self._base = task_vector, index, base

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self._tv[key]
        expected = tuple(self._base[key].shape)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"task vector {self._index}: key '{key}' has shape {list(tensor.shape)}, "
                                  f"the base has {list(expected)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"task vector {self._index}: key '{key}' contains NaN or Inf values")
        return tensor

    def __iter__(self):  # noqa: ANN204
        return iter(self._tv)

    def __len__(self) -> int:
        return len(self._tv)


def merge(name: str, base: Mapping[str, torch.Tensor], task_vectors: TaskVectors, **options: Any) -> StateDict:
    """Run the method ``name``; options it does not take are an error naming the option.

    Task vectors must hold base keys only, with the base's shapes and finite values (checked as they are read).
    """
    fn = get_merge_method(name)
    accepted = set(method_options(name))
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise OptionError(f"option '{unknown[0]}' does not apply to --method {name} (it takes {sorted(accepted)})")
    for index, tv in enumerate(task_vectors):
        stray = [key for key in tv if key not in base]
        if stray:
            raise CheckpointError(f"task vector {index}: key '{stray[0]}' is not in the base")
    checked = [CheckedTaskVector(tv, index, base) for index, tv in enumerate(task_vectors)]
    return fn(base, checked, **options)


__all__ = ["MERGE_METHODS", "STATIC_MERGES", "get_merge_method", "merge", "method_options"]
