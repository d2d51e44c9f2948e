"""Confinement and integrity of an artifact, checked before any of its files is opened.

An artifact is a trust boundary (it may come from a stranger; it is data, never code): every file ``load``
reads is a plain relative name inside the directory, listed in the manifest with its size and sha256; the
directory is walked with ``lstat``, following nothing, and a symlink, a FIFO, a socket, a device or an
unlisted file is refused; a referenced outside base must match its recorded size and sha256.
"""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path, PurePosixPath

from massmerge.artifact.manifest import FACTORS_FILE, HEADS_FILE, MANIFEST, MODEL_DIR, Manifest
from massmerge.errors import MassMergeError

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



__all__ = ["sha256_file", "verify_files"]
