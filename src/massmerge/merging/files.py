"""``massmerge merge``'s library half: checkpoints on disk in, one merged safetensors state dict out.

The base is read whole (it is the result's template); experts are opened lazily and validated against the
base from their headers alone, their values checked as the merge reads them (``CheckedTaskVector``), so each
tensor is read once. The merge runs on ``device`` and the result is cast to ``dtype`` (default: the base's own
per key) before it is written atomically with the method and options in its metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from massmerge.checkpoints import (
    check_finite,
    is_pickle_source,
    load_state_dict,
    open_checkpoint,
    save_state_dict,
    validate_compatible,
)
from massmerge.errors import OptionError
from massmerge.merging.registry import merge
from massmerge.sources import resolve_source
from massmerge.task_vectors import CheckedTaskVector, KeyFilter


def open_expert(path: Path, base: Mapping[str, torch.Tensor], *, trust_pickle: bool) -> Mapping[str, torch.Tensor]:
    """An expert opened lazily (safetensors) or loaded (trusted pickle), its keys, shapes and dtypes checked
    against the base from the header alone."""
    expert = load_state_dict(path, trust_pickle=True) if trust_pickle and is_pickle_source(path) \
        else open_checkpoint(path)
    validate_compatible(base, expert, name=str(path))
    return expert


def merge_files(method: str, base: Path, experts: Sequence[Path], output: Path, *, options: Mapping[str, Any],
                include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                trust_pickle: bool = False, device: torch.device | None = None,
                dtype: torch.dtype | None = None) -> int:
    """Merge ``experts`` into ``base`` with ``method`` and write ``output``; returns the number of tensors."""
    base, experts = resolve_source(base), [resolve_source(p) for p in experts]  # local path, or hub id -> snapshot
    base_state = load_state_dict(base, trust_pickle=trust_pickle)
    check_finite(base_state, name=str(base))
    key_filter = KeyFilter.from_patterns(include, exclude)
    opened = [open_expert(p, base_state, trust_pickle=trust_pickle) for p in experts]
    task_vectors = [CheckedTaskVector(base_state, expert, name=str(path), key_filter=key_filter)
                    for path, expert in zip(experts, opened)]
    if not len(task_vectors[0]):
        raise OptionError("--include/--exclude: no floating-point key is left to merge")
    merged = merge(method, base_state, task_vectors, device=device, **options)
    if dtype is not None:
        merged = {key: value.to(dtype) if value.is_floating_point() else value for key, value in merged.items()}
    metadata = {"massmerge_method": method, "massmerge_options": json.dumps(dict(options)),
                "massmerge_experts": json.dumps([str(p) for p in experts])}
    save_state_dict(merged, output, metadata=metadata)
    return len(merged)


__all__ = ["merge_files", "open_expert"]
