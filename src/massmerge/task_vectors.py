"""Task vectors: what each expert changed relative to the base.

``delta_t = theta_t - theta_0`` over every floating-point parameter. 2-D parameters ("matrices") get the
low-rank treatment; everything else ("non-matrix": biases, norms, class token, conv kernels) is averaged.
Keys the task does not use (e.g. a CLIP text tower) are dropped with :class:`KeyFilter` patterns.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from massmerge.errors import OptionError

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class KeyFilter:
    """Include/exclude glob patterns on parameter names (``fnmatch`` syntax, e.g. ``text_model.*``).

    A key passes when it matches some include pattern (or there are none) and no exclude pattern.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def from_patterns(cls, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None) -> "KeyFilter":
        """Build a filter from optional pattern lists; empty patterns are an error (they match nothing)."""
        inc, exc = tuple(include or ()), tuple(exclude or ())
        for option, patterns in (("--include", inc), ("--exclude", exc)):
            if any(not p.strip() for p in patterns):
                raise OptionError(f"{option}: empty key pattern")
        return cls(inc, exc)

    def __call__(self, key: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(key, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(key, p) for p in self.exclude)


ALL_KEYS = KeyFilter()


def work_dtype(tensor: torch.Tensor, requested: torch.dtype | None = None) -> torch.dtype:
    """The dtype the math runs in: ``requested`` if given, float64 for float64 input, else float32.

    Why: fp16/bf16 checkpoints must not be factorized in half precision, and float64 inputs (tests, careful
    users) must not be silently truncated to float32.
    """
    if requested is not None:
        return requested
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def is_matrix(tensor: torch.Tensor) -> bool:
    """A 'matrix' is a 2-D floating parameter; it gets per-task low-rank factors."""
    return tensor.ndim == 2 and tensor.is_floating_point()


def mergeable_keys(base: Mapping[str, torch.Tensor], key_filter: KeyFilter = ALL_KEYS) -> list[str]:
    """Floating-point keys of the base that pass the filter, in the base's order."""
    return [key for key in base if base[key].is_floating_point() and key_filter(key)]


def task_vector(
    base: Mapping[str, torch.Tensor],
    expert: Mapping[str, torch.Tensor],
    *,
    key_filter: KeyFilter = ALL_KEYS,
    dtype: torch.dtype | None = None,
) -> StateDict:
    """``expert - base`` for every mergeable key, in ``dtype`` (default :func:`work_dtype` of the base tensor)."""
    return {key: _delta(base[key], expert[key], dtype) for key in mergeable_keys(base, key_filter)}


def _delta(base: torch.Tensor, expert: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    compute = work_dtype(base, dtype)
    return expert.to(compute) - base.to(compute)


class LazyTaskVector(Mapping[str, torch.Tensor]):
    """``expert - base`` computed key by key on access, so a lazily opened expert stays on disk."""

    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        expert: Mapping[str, torch.Tensor],
        *,
        key_filter: KeyFilter = ALL_KEYS,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._base, self._expert, self._dtype = base, expert, dtype
        self._keys = mergeable_keys(base, key_filter)
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return _delta(self._base[key], self._expert[key], self._dtype)

    def __iter__(self):  # noqa: ANN204
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def add_delta(base: torch.Tensor, delta: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``base + alpha * delta`` computed in float32 (float64 for float64 deltas), cast back to the base dtype.

    The one place where a merged delta is applied: static merges, MASS's first pass and its dense reference
    second pass all go through it, so they round identically.
    """
    compute = torch.promote_types(delta.dtype, torch.float32)
    return (base.to(compute) + alpha * delta.to(compute)).to(base.dtype)


def split_matrix(keys: Sequence[str], base: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Partition keys into (matrix keys, non-matrix keys) by the base tensor's shape."""
    matrices = [k for k in keys if is_matrix(base[k])]
    others = [k for k in keys if not is_matrix(base[k])]
    return matrices, others
