"""Confinement and integrity of an artifact, checked before any of its files is opened.

An artifact is a trust boundary (it may come from a stranger; it is data, never code): every file ``load``
reads is a plain relative name inside the directory, listed in the manifest with its size and sha256; the
directory is walked with ``lstat``, following nothing, and a symlink, a FIFO, a socket, a device or an
unlisted file is refused; a referenced outside base must match its recorded size and sha256. A sharded base's
index (``model/model.safetensors.index.json``) may name only listed shard files of ``model/``, and must name every
one of them (:func:`shard_map`).
"""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path, PurePosixPath

from massmerge.artifact.manifest import (
    FACTORS_FILE,
    HEADS_FILE,
    MANIFEST,
    MODEL_DIR,
    Manifest,
    is_shard_name,
    listed_shards,
)
from massmerge.checkpoints import HF_SHARD_INDEX
from massmerge.errors import MassMergeError
from massmerge.io.jsonfile import read_json_file

HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(directory: Path, manifest: Manifest, *, checksums: bool = True) -> None:
    """Confinement and integrity, checked with ``lstat`` before any listed file is opened: nothing in
    ``directory`` is a symlink, a FIFO, a device or an unlisted file or directory; every listed file is a
    regular file with its size and (``checksums``) sha256; the required files are listed; a referenced base
    matches its recorded size and sha256."""
    directory = Path(directory)
    _check_entries(directory, manifest)
    required = [FACTORS_FILE, HEADS_FILE] + ([manifest.base.file] if manifest.base.file else [])
    if manifest.architecture.kind == "adapter":
        required.append(f"{MODEL_DIR}/config.json")
    for name in required:
        if name not in manifest.files:
            raise MassMergeError(f"{directory / name}: required but not listed in {MANIFEST}")
    for name, entry in manifest.files.items():
        path = directory / name
        if not path.is_file() or path.is_symlink():
            raise MassMergeError(f"{path}: missing from the artifact (it is listed in {MANIFEST})")
        if path.stat().st_size != entry.bytes or (checksums and sha256_file(path) != entry.sha256):
            raise MassMergeError(f"{path}: checksum mismatch (the file is corrupt or was modified)")
    if manifest.base.mode == "reference":
        ref = Path(manifest.base.path or "")
        if ref.is_symlink() or not ref.is_file():
            raise MassMergeError(f"{ref}: referenced base checkpoint is missing (or not a plain file)")
        if ref.stat().st_size != manifest.base.bytes or (checksums and sha256_file(ref) != manifest.base.sha256):
            raise MassMergeError(f"{ref}: checksum mismatch with the base the artifact was built from")
    if manifest.base.file == f"{MODEL_DIR}/{HF_SHARD_INDEX}":
        shard_map(directory, manifest)


def shard_map(directory: Path, manifest: Manifest) -> dict[str, list[str]]:
    """A sharded base's index read and checked: shard file name -> the tensor names the index puts in it.

    Why so strict: transformers opens whatever file the index names, so a name outside ``model/`` (``..``, an
    absolute path, a sub-directory), a file that is not a listed shard, or a listed shard the index leaves out
    (data the manifest vouches for but nothing reads) is refused, each in one line naming the file.
    """
    index = Path(directory) / (manifest.base.file or "")
    raw = read_json_file(index, "a shard index")
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(key, str) and isinstance(name, str) for key, name in weight_map.items()):
        raise MassMergeError(f"{index}: field 'weight_map' must map tensor names to shard file names")
    shards: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        if not name or PurePosixPath(name).is_absolute() or "/" in name or "\\" in name or name in (".", ".."):
            raise MassMergeError(f"{index}: tensor '{key}' is in '{name}', which is not a file inside {MODEL_DIR}/")
        if not is_shard_name(name):
            raise MassMergeError(f"{index}: tensor '{key}' is in '{name}', which is not a shard file name "
                                 "(model-0000i-of-0000N.safetensors)")
        if f"{MODEL_DIR}/{name}" not in manifest.files:
            raise MassMergeError(f"{Path(directory) / MODEL_DIR / name}: a shard the index names is missing (not "
                                 f"listed in {MANIFEST})")
        shards.setdefault(name, []).append(key)
    for listed in listed_shards(manifest):
        if listed.removeprefix(f"{MODEL_DIR}/") not in shards:
            raise MassMergeError(f"{Path(directory) / listed}: a shard {HF_SHARD_INDEX} does not name")
    return shards


def _check_entries(directory: Path, manifest: Manifest) -> None:
    """Every entry under ``directory`` (by ``lstat``: nothing is followed or opened) is the manifest, a listed
    regular file or a directory holding listed files."""
    listed = set(manifest.files)
    folders = {parent.as_posix() for name in listed for parent in PurePosixPath(name).parents} - {"."}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise MassMergeError(f"{path}: a symlink inside the artifact is refused")
        if stat.S_ISDIR(mode):
            if name not in folders:
                raise MassMergeError(f"{path}: a directory {MANIFEST} does not list; refusing the artifact")
        elif not stat.S_ISREG(mode):
            raise MassMergeError(f"{path}: not a regular file (a FIFO, socket or device); refusing the artifact")
        elif name != MANIFEST and name not in listed:
            raise MassMergeError(f"{path}: not listed in {MANIFEST}; refusing an artifact with unlisted files")



__all__ = ["sha256_file", "shard_map", "verify_files"]
