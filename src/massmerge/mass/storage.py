"""How MASS factors are stored: the storage dtype, and rounding to it so that memory equals disk.

Why the factor dtype: a task keeps ``k (m + n + 1)`` numbers per matrix with ``k = min(m, n) / T``, so the T
tasks together store ``(1 + min/max)`` times each matrix: up to 2x for square matrices. By default factors are
stored in float16 for 32/64-bit bases (about 1.6-1.8x the base) and in the base's own dtype for 16-bit bases;
:func:`round_factors` applies the same rounding in memory, which is what ``massmerge build``, ``evaluate`` and
the suite serve, so a saved artifact predicts bit-identically to the model that was scored.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from massmerge.choices import DTYPE_NAMES
from massmerge.errors import OptionError
from massmerge.lowrank import LowRank
from massmerge.mass.experts import ExpertFactors

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype, *, option: str = "--factor-dtype") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise OptionError(f"{option}: unknown dtype '{name}' (choose {', '.join(DTYPES)})")
    return DTYPES[name]


def storage_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Default factor storage: float16 for 32/64-bit bases, the base's own dtype for 16-bit ones."""
    return base_dtype if base_dtype in (torch.float16, torch.bfloat16) else torch.float16


def factor_storage(choice: str, base_dtype: torch.dtype) -> torch.dtype:
    """``--factor-dtype``: ``auto`` (see :func:`storage_dtype`) or an explicit dtype name."""
    return storage_dtype(base_dtype) if choice == "auto" else parse_dtype(choice)


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(t.dtype)


def round_factors(factors: ExpertFactors, dtype: torch.dtype, *, in_place: bool = False) -> ExpertFactors:
    """Factors rounded to ``dtype`` (storage) and back (compute): saving them in ``dtype`` is then lossless.

    Singular values stay in full precision (they are stored as float32 at least). ``in_place``: round the given
    tensors themselves and return ``factors`` (why: a second full copy of every factor was the peak of
    ``massmerge build``; in place, the peak is one tensor's storage-dtype copy).
    """
    if in_place:
        for per_task in factors.matrices.values():
            for f in per_task:
                f.U.copy_(f.U.to(dtype))
                f.V.copy_(f.V.to(dtype))
        for per_task in factors.non_matrix.values():
            for t in per_task:
                t.copy_(t.to(dtype))
        return factors
    matrices = {key: [LowRank(_round(f.U, dtype), f.s, _round(f.V, dtype)) for f in per_task]
                for key, per_task in factors.matrices.items()}
    non_matrix = {key: [_round(t, dtype) for t in per_task] for key, per_task in factors.non_matrix.items()}
    return ExpertFactors(task_names=list(factors.task_names), rank_fraction=factors.rank_fraction,
                         matrices=matrices, non_matrix=non_matrix, accepted=dict(factors.accepted), eps=factors.eps)


def to_storage(factors: ExpertFactors, dtype: torch.dtype) -> ExpertFactors:
    """``factors`` with U, V and the non-matrix deltas held in ``dtype`` (singular values as they are), converted
    one tensor at a time in place; returns ``factors``. For writing only: the factors no longer serve (MASS
    computes in the base's precision). Why: :func:`write_artifact` writes the storage dtype, and converting at
    write time held a second, storage-dtype copy of every factor beside the float32 ones (build's peak memory,
    issue 10); converted first, the float32 tensors are freed as their copies are made."""
    for per_task in factors.matrices.values():
        for t, f in enumerate(per_task):
            per_task[t] = LowRank(f.U.to(dtype).contiguous(), f.s, f.V.to(dtype).contiguous())
    for per_task in factors.non_matrix.values():
        for t, delta in enumerate(per_task):
            per_task[t] = delta.to(dtype).contiguous()
    return factors


def float_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the first floating-point tensor: the base's own precision."""
    for value in state.values():
        if value.is_floating_point():
            return value.dtype
    raise OptionError("base model: has no floating-point parameter")



__all__ = ["DTYPES", "dtype_name", "factor_storage", "float_dtype", "parse_dtype", "round_factors", "storage_dtype",
           "to_storage"]
