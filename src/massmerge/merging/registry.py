"""The registry of static merges: ``merge(name, base, task_vectors, **opts) -> state dict``.

Each method lives in its own module as a pure function over tensors; this registry maps the public method
names (the CLI's ``--method``) to them and checks option names, so a typo is an error, not a silent default.
Methods read each task's tensors key by key and may change what they read in place: :func:`merge` gives them
:class:`~massmerge.task_vectors.CheckedTaskVector` views, whose every read is a fresh, checked tensor.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from massmerge.device import resolve_device
from massmerge.errors import CheckpointError, OptionError
from massmerge.merging import iso_c, iso_cts, task_arithmetic, ties, tsv_c, tsv_m, weight_average
from massmerge.merging.common import StateDict, TaskVectors
from massmerge.merging.names import METHOD_NAMES, STATIC_MERGES
from massmerge.task_vectors import CheckedTaskVector

MergeFn = Callable[..., StateDict]

MERGE_METHODS: dict[str, MergeFn] = {  # in the order of names.METHOD_NAMES
    "weight_average": weight_average.merge,
    "task_arithmetic": task_arithmetic.merge,
    "ties": ties.merge,
    "tsv_m": tsv_m.merge,
    "tsv_c": tsv_c.merge,
    "iso_c": iso_c.merge,
    "iso_cts": iso_cts.merge,
}

assert tuple(MERGE_METHODS) == METHOD_NAMES, "names.METHOD_NAMES and the registry must list the same methods"


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


def merge(name: str, base: Mapping[str, torch.Tensor], task_vectors: TaskVectors, *,
          device: torch.device | str | None = None, **options: Any) -> StateDict:
    """Run the method ``name``; options it does not take are an error naming the option.

    Task vectors must hold base keys only, with the base's shapes and finite values: each is viewed through
    :class:`~massmerge.task_vectors.CheckedTaskVector`, which checks every tensor as the method reads it and
    hands the method a fresh tensor it may change in place (the user's own tensors are never modified).
    ``device``: where the merge computes (the base is copied there; each expert tensor is moved there as it is
    read); the merged state dict is left on it.
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
    checked = [tv if isinstance(tv, CheckedTaskVector)
               else CheckedTaskVector(base, tv, name=f"task vector {index}", is_delta=True)
               for index, tv in enumerate(task_vectors)]
    if device is not None:
        target = resolve_device(device)
        base = {key: value.to(target) for key, value in base.items()}
        checked = [tv.on(target) for tv in checked]
    return fn(base, checked, **options)


__all__ = ["MERGE_METHODS", "STATIC_MERGES", "get_merge_method", "merge", "method_options"]
