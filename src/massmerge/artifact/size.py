"""How big an artifact is against its base: the figure ``--max-size`` and the docs speak of.

Both sides come from the manifest's file entries (sizes checked at load): the artifact's files with the
manifest, over the base as the artifact holds it (``model/``'s files, or the base's safetensors file).
"""

from __future__ import annotations

import os
from pathlib import Path

from massmerge.artifact.manifest import BASE_FILE, MANIFEST, MODEL_DIR, base_weight_files, read_manifest


def base_file_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes of the base as the artifact holds it: the files of ``model/`` (weights, config, tokenizer) or the
    base's safetensors file; for a referenced base, that file. The denominator of "N x the base"."""
    manifest = read_manifest(directory)
    if manifest.base.mode == "reference":
        return int(manifest.base.bytes or 0)
    if manifest.architecture.kind == "adapter":
        return sum(e.bytes for name, e in manifest.files.items() if name.startswith(f"{MODEL_DIR}/"))
    return manifest.files[manifest.base.file or BASE_FILE].bytes


def artifact_bytes(directory: str | os.PathLike[str], *, include_base: bool = True) -> int:
    """Total size of an artifact's files (manifest included); without the base's weights (its file, or a sharded
    base's index and shards) when asked."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    total = (directory / MANIFEST).stat().st_size + sum(e.bytes for e in manifest.files.values())
    if not include_base:
        total -= sum(manifest.files[name].bytes for name in base_weight_files(manifest))
    return total



__all__ = ["artifact_bytes", "base_file_bytes"]
