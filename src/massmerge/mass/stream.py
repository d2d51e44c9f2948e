"""Streaming reduction of experts to MASS factors: one expert open at a time, one tensor read at a time.

Why: peak memory of building a MASS model must grow with the factors, not with T checkpoints (design.md
section 7). :func:`stream_task_vectors` opens each expert only when ``ExpertFactors.build`` asks for the next
one and drops it before the following is opened; :class:`~massmerge.task_vectors.CheckedTaskVector` (the same
view ``massmerge merge`` uses) validates each tensor (shape, finiteness) as it is read, so an expert is read
once, not once to check and once to factorize.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from massmerge.checkpoints import open_checkpoint
from massmerge.choices import SVDMethod
from massmerge.mass.config import DEFAULT_EPS
from massmerge.mass.experts import ExpertFactors
from massmerge.task_vectors import ALL_KEYS, CheckedTaskVector, KeyFilter

OpenFn = Callable[[Path], Mapping[str, torch.Tensor]]


def stream_task_vectors(base: Mapping[str, torch.Tensor], experts: Sequence[Any], *,
                        open_expert: OpenFn = open_checkpoint, key_filter: KeyFilter = ALL_KEYS
                        ) -> Iterator[CheckedTaskVector]:
    """Yield one lazily read task vector per expert path; each is opened only when the consumer asks for it."""
    for path in experts:
        yield CheckedTaskVector(base, open_expert(Path(path)), name=str(path), key_filter=key_filter)


def build_factors(base: Mapping[str, torch.Tensor], experts: Sequence[Any], task_names: Sequence[str], *,
                  rank_fraction: float | None = None, eps: float | None = DEFAULT_EPS, svd: SVDMethod = "auto",
                  open_expert: OpenFn = open_checkpoint, key_filter: KeyFilter = ALL_KEYS) -> ExpertFactors:
    """:meth:`ExpertFactors.build` over experts streamed from disk one at a time."""
    stream = stream_task_vectors(base, experts, open_expert=open_expert, key_filter=key_filter)
    return ExpertFactors.build(stream, task_names, rank_fraction=rank_fraction, eps=eps, svd=svd)
