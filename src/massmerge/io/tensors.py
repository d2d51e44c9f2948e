"""The one safe safetensors reader and writer of artifacts and heads files.

Reading: every tensor of a file (and its string metadata), with an optional closed list of the tensor names
the caller expects, refused from the header before any tensor is read; any failure is one line naming the
file. Writing: no copy of a tensor unless it shares storage with an earlier one (safetensors refuses shared
storage), fsynced, and with its metadata in a canonical order so that equal inputs give equal bytes.

Checkpoints (base and experts) are read lazily by :mod:`massmerge.checkpoints` instead: one tensor at a time.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from massmerge.errors import MassMergeError
from massmerge.io.atomic import fsync_file


def read_safetensors(path: Path, *, where: str | None = None, expected: Collection[str] | None = None,
                     what: str = "safetensors file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file on the CPU; with ``expected``, a tensor not in it is refused
    from the header, before any tensor is read. Errors name ``where`` (default: the path)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            unexpected = sorted(set(keys) - set(expected)) if expected is not None else []
            if unexpected:
                raise MassMergeError(f"{where or path}: tensor '{unexpected[0]}' is not described by manifest.json "
                                     f"({len(unexpected)} such tensors)")
            metadata = handle.metadata() or {}
            return {key: handle.get_tensor(key) for key in keys}, dict(metadata)
    except (SafetensorError, OSError, ValueError) as exc:
        raise MassMergeError(f"{where or path}: not a readable {what} ({str(exc).splitlines()[0][:200]})") from None


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors without copying: only tensors that share storage with an earlier one are cloned; fsynced."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        value = value.detach().cpu()
        ident = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
        out[key] = value.clone().contiguous() if ident in seen and value.numel() else value.contiguous()
        seen.add(ident)
    save_file(out, str(path), metadata=metadata)
    canonicalize_metadata_order(path)
    fsync_file(path)


def canonicalize_metadata_order(file: Path) -> None:
    """Sort the ``__metadata__`` entries of a safetensors header in place, so equal inputs give equal bytes.

    Why: safetensors serializes metadata from a Rust HashMap whose order changes from process to process. The
    sorted header has the same length (same strings, reordered), so only the header bytes are rewritten; if the
    length ever differed the file is left as written (it is valid either way).
    """
    with open(file, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        raw = handle.read(size)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or len(meta) < 2:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > size or raw.rstrip(b" ") != raw[: len(text)] or len(raw.rstrip(b" ")) != len(text):
            return
        handle.seek(8)
        handle.write(text + b" " * (size - len(text)))


__all__ = ["canonicalize_metadata_order", "read_safetensors", "save_tensors"]
