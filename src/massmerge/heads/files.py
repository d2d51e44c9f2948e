"""The ``--heads`` file format: one task's head as a safetensors file, checked before any expert is read.

A heads file holds ``weight`` [C, d] (+ optional ``bias`` [C]) and string metadata ``kind`` (``zero_shot`` or
``linear``, default linear), ``logit_scale`` (zero-shot, required), ``class_names`` (a JSON list of C strings)
and ``task`` (the task name unless ``--task-names`` is given). Files come from users and strangers: every
problem is one line naming the file and the field.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from massmerge.checkpoints import save_state_dict
from massmerge.choices import check_task_names
from massmerge.errors import MassMergeError, OptionError
from massmerge.heads.modules import LinearHead, ZeroShotHead
from massmerge.io.tensors import read_safetensors


class HeadSet(NamedTuple):
    """The heads of a build, in expert order, with their task names and class names (None where unnamed)."""

    heads: list[nn.Module]
    names: list[str]
    class_names: list[list[str] | None]


def write_head_file(path: str | os.PathLike[str], head: nn.Module, *, task: str | None = None,
                    class_names: Sequence[str] | None = None) -> None:
    """Write a head as the ``--heads`` file format: safetensors ``weight`` [C, d] (+ ``bias``) and metadata
    ``kind`` (zero_shot | linear), ``logit_scale`` (zero_shot), ``class_names`` (JSON list) and ``task``."""
    tensors = {"weight": head.weight}
    meta = {"kind": "zero_shot" if isinstance(head, ZeroShotHead) else "linear"}
    if isinstance(head, ZeroShotHead):
        meta["logit_scale"] = repr(head.logit_scale)
    elif getattr(head, "bias", None) is not None:
        tensors["bias"] = head.bias
    if class_names is not None:
        meta["class_names"] = json.dumps(list(class_names))
    if task is not None:
        meta["task"] = task
    save_state_dict(tensors, path, metadata=meta)


def read_head_file(path: str | os.PathLike[str]) -> tuple[nn.Module, str | None, list[str] | None]:
    """(head, task name or None, class names or None) from a ``--heads`` file; errors name the file and field.

    Checked before any expert is read: a float 2-D ``weight`` with at least one row and finite values, a bias
    of one value per class, a finite positive ``logit_scale`` for zero-shot heads (required: a silent default
    would make that head's logits incomparable with the others), class names matching the rows.
    """
    path = Path(path)
    if not path.is_file():
        raise MassMergeError(f"{path}: no such heads file")
    tensors, meta = read_safetensors(path, what="safetensors heads file")
    weight = tensors.get("weight")
    if weight is None or weight.ndim != 2 or not weight.is_floating_point():
        raise MassMergeError(f"{path}: a heads file needs a floating 2-D tensor 'weight' [classes, dim]")
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise MassMergeError(f"{path}: 'weight' has shape {list(weight.shape)}; a head needs at least one class")
    if not bool(torch.isfinite(weight).all()):
        raise MassMergeError(f"{path}: 'weight' contains NaN or Inf values")
    kind = meta.get("kind", "linear")
    names = _class_names(meta, path, int(weight.shape[0]))
    if kind == "zero_shot":
        if "logit_scale" not in meta:
            raise MassMergeError(f"{path}: metadata logit_scale is missing (required for a zero_shot head)")
        head: nn.Module = ZeroShotHead(weight, _logit_scale(meta["logit_scale"], f"{path}: metadata logit_scale"))
    elif kind == "linear":
        bias = tensors.get("bias")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise MassMergeError(f"{path}: 'bias' has shape {list(bias.shape)}, expected [{weight.shape[0]}]")
        if bias is not None and not bool(torch.isfinite(bias).all()):
            raise MassMergeError(f"{path}: 'bias' contains NaN or Inf values")
        head = LinearHead(weight, bias)
    else:
        raise MassMergeError(f"{path}: metadata kind '{kind}' is not zero_shot or linear")
    return head, meta.get("task"), names


def _logit_scale(raw: Any, where: str) -> float:
    try:
        scale = float(raw)
    except (TypeError, ValueError):
        raise MassMergeError(f"{where} is not a number (got {raw!r})") from None
    if not math.isfinite(scale) or scale <= 0:
        raise MassMergeError(f"{where} must be a finite positive number (got {raw!r})")
    return scale


def _class_names(meta: Mapping[str, str], path: Path, classes: int) -> list[str] | None:
    if "class_names" not in meta:
        return None
    try:
        names = json.loads(meta["class_names"])
    except (ValueError, RecursionError):
        names = None
    if not isinstance(names, list) or len(names) != classes or not all(isinstance(n, str) for n in names):
        raise MassMergeError(f"{path}: metadata class_names must be a JSON list of {classes} strings")
    return names



def read_heads_files(paths: Sequence[Path], task_names: Sequence[str] | None, experts: Sequence[Path]) -> HeadSet:
    """One head per expert (``--heads``, in expert order), checked before any expert is read: one feature width
    for all, and task names (``--task-names``, else each file's ``task`` metadata, else the expert's file name)
    that are valid and unique."""
    if len(paths) != len(experts):
        raise OptionError(f"--heads: {len(paths)} heads files for {len(experts)} experts")
    if task_names is not None and len(task_names) != len(experts):
        raise OptionError(f"--task-names: {len(task_names)} names for {len(experts)} experts")
    heads, names, classes = [], [], []
    for index, path in enumerate(paths):
        head, task, class_names = read_head_file(path)
        if heads and head_width(head) != head_width(heads[0]):
            raise OptionError(f"{path}: 'weight' is {head_width(head)} wide, but {paths[0]} is "
                              f"{head_width(heads[0])} wide (every head reads the same features)")
        heads.append(head)
        classes.append(class_names)
        names.append(task_names[index] if task_names else task or experts[index].stem)
    check_task_names(names, "--task-names" if task_names else "task names (the heads files' 'task' metadata, "
                     "else the experts' file names; set them with --task-names)")
    return HeadSet(heads, names, classes)


def head_width(head: nn.Module) -> int:
    """The feature width a head reads (its weight is [classes, width])."""
    return int(head.weight.shape[1])



__all__ = ["HeadSet", "head_width", "read_head_file", "read_heads_files", "write_head_file"]
