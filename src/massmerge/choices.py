"""Closed sets of option values, and the rule on task names, that several layers share (torch-free).

Why here: the command line reads these for its help and checks before it imports torch, and the lowest layer
that uses each one (``lowrank`` for the SVD methods, ``mass.storage`` for dtypes, artifacts, heads files and
benchmark configs for task names) sits below every module that names it, so it is defined once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

from massmerge.errors import OptionError

SVDMethod = Literal["auto", "exact", "randomized"]  # truncated SVD: exact / randomized, or auto by rank
SVD_METHODS: tuple[str, ...] = get_args(SVDMethod)
DtypeName = Literal["float64", "float32", "float16", "bfloat16"]  # dtypes a manifest or a flag may name
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)


def task_name_problem(names: Sequence[str]) -> str | None:
    """What is wrong with a list of task names, or None: every name is non-empty and free of '/' (names are
    parts of safetensors keys in an artifact) and none is given twice."""
    for name in names:
        if not isinstance(name, str) or not name or "/" in name:
            return f"'{name}' is not a valid task name (non-empty, no '/')"
    duplicate = next((n for n in names if list(names).count(n) > 1), None)
    return None if duplicate is None else f"task '{duplicate}' is listed twice"


def check_task_names(names: Sequence[str], source: str = "--task-names") -> None:
    """One :class:`OptionError` line naming ``source`` (where the names came from) when a name is bad."""
    problem = task_name_problem(names)
    if problem is not None:
        raise OptionError(f"{source}: {problem}")


__all__ = ["DTYPE_NAMES", "DtypeName", "SVDMethod", "SVD_METHODS", "check_task_names", "task_name_problem"]
