"""Task vectors: what each expert changed relative to the base.

``delta_t = theta_t - theta_0`` over every floating-point parameter. 2-D parameters ("matrices") get the
low-rank treatment; everything else ("non-matrix": biases, norms, class token, conv kernels) is averaged.
Keys the task does not use (e.g. a CLIP text tower) are dropped with :class:`KeyFilter` patterns.
"""

from __future__ import annotations

import copy
import fnmatch
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from massmerge.checkpoints import all_finite
from massmerge.errors import CheckpointError, OptionError

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


class CheckedTaskVector(Mapping[str, torch.Tensor]):
    """A task vector read key by key, each tensor checked as it is read: the base's shape and finite values.

    The one task-vector view that ``massmerge merge``, ``merging.merge`` and the MASS build stream all use:
    - from an expert (default): ``expert - base`` computed on access, so a lazily opened expert stays on disk
      and each tensor is read exactly once per access (from a :class:`~massmerge.checkpoints.LazyCheckpoint`
      without a copy: the subtraction reads the file's pages directly);
    - from a task vector already computed (``is_delta=True``: a user's dict, LoRA's ``B A``).
    A wrong shape or a NaN/Inf raises :class:`CheckpointError` naming ``name`` (the file) and the key, so an
    expert needs no separate validation pass over its data. Every tensor returned is the caller's to change.
    """

    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        source: Mapping[str, torch.Tensor],
        *,
        name: str | None = None,
        key_filter: KeyFilter = ALL_KEYS,
        dtype: torch.dtype | None = None,
        is_delta: bool = False,
        device: torch.device | None = None,
    ) -> None:
        self._base, self._source, self._dtype, self._is_delta = base, source, dtype, is_delta
        self._device = device  # where each delta is computed and returned (None: where the expert's tensor is)
        self.name = name or _describe(source)
        if is_delta:
            self._keys = list(source)  # merging.merge checks them against the base
        else:
            self._keys = mergeable_keys(base, key_filter)
            present = set(iter(source))  # iterating keys reads no tensor (``in`` on a Mapping would)
            missing = [k for k in self._keys if k not in present]
            if missing:
                raise CheckpointError(f"{self.name}: key '{missing[0]}' of the base is missing "
                                      f"({len(missing)} missing)")
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.read(key)

    @property
    def device(self) -> torch.device | None:
        """Where the deltas are computed (None: where the expert's tensors are)."""
        return self._device

    def on(self, device: torch.device) -> CheckedTaskVector:
        """The same view with every delta computed on ``device`` (the expert is still read from its file)."""
        view = copy.copy(self)
        view._device = device
        return view

    def read(self, key: str, rows: slice | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The checked delta of ``key`` (only the rows ``rows`` of it, if given), in the work dtype.

        ``out``, a tensor of the delta's shape and dtype, receives the delta instead of new memory: a caller
        that reads T deltas of one key reuses one buffer (fresh memory costs page faults on every read).
        """
        if key not in self._key_set:
            raise KeyError(key)
        borrow = getattr(self._source, "borrow", None)
        if borrow is None:
            return self._delta(key, self._source[key], rows, out)
        with borrow(key) as view:
            return self._delta(key, view, rows, out)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of ``key``'s delta: the base's (every read is checked against it)."""
        if key not in self._key_set:
            raise KeyError(key)
        return tuple(self._source[key].shape) if self._is_delta else tuple(self._base[key].shape)

    def work_dtype(self, key: str) -> torch.dtype:
        """The dtype :meth:`read` returns for ``key`` (without reading an expert tensor)."""
        return work_dtype(self._source[key] if self._is_delta else self._base[key], self._dtype)

    def _delta(self, key: str, value: torch.Tensor, rows: slice | None, out: torch.Tensor | None) -> torch.Tensor:
        base = self._base[key]
        if self._device is not None:
            value, base = value.to(self._device, non_blocking=True), base.to(self._device)
        if tuple(value.shape) != tuple(base.shape):
            raise CheckpointError(f"{self.name}: key '{key}' has shape {list(value.shape)}, the base has "
                                  f"{list(base.shape)}")
        if rows is not None:
            value, base = value[rows], base[rows]
        compute = work_dtype(value if self._is_delta else base, self._dtype)
        if out is not None and (out.shape != value.shape or out.dtype != compute or out.device != value.device):
            out = None
        if self._is_delta:
            delta = value.to(compute) if out is None else out.copy_(value)
            if delta is value:  # never hand out the caller's (or the file's) own tensor
                delta = value.clone()
        else:
            delta = torch.sub(value.to(compute), base.to(compute), out=out)
        if not all_finite(delta):
            raise CheckpointError(f"{self.name}: key '{key}' contains NaN or Inf values")
        return delta

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _describe(source: Mapping[str, torch.Tensor]) -> str:
    """What an error names when the caller gave no name: the checkpoint's file, else 'expert'."""
    for attribute in ("name", "source"):
        value = getattr(source, attribute, None)
        if isinstance(value, (str, os.PathLike)):
            return str(value)
    return "expert"




def add_delta(base: torch.Tensor, delta: torch.Tensor, alpha: float = 1.0, *, inplace: bool = False) -> torch.Tensor:
    """``base + alpha * delta`` computed in float32 (float64 for float64 deltas), cast back to the base dtype.

    The one place where a merged delta is applied: static merges, MASS's first pass and its dense reference
    second pass all go through it, so they round identically. ``inplace`` lets a caller that owns ``delta``
    reuse its memory for the sum (same operations, same rounding: ``alpha * delta`` then ``+ base``).
    """
    compute = torch.promote_types(delta.dtype, torch.float32)
    if not (inplace and delta.dtype == compute):
        return (base.to(compute) + alpha * delta.to(compute)).to(base.dtype)
    if alpha != 1.0:
        delta.mul_(alpha)
    return delta.add_(base.to(compute)).to(base.dtype)


def split_matrix(keys: Sequence[str], base: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Partition keys into (matrix keys, non-matrix keys) by the base tensor's shape."""
    matrices = [k for k in keys if is_matrix(base[k])]
    others = [k for k in keys if not is_matrix(base[k])]
    return matrices, others
