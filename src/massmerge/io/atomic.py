"""Atomic outputs: a temp file or directory next to the output, fsynced, then renamed into place.

Why: a failure at any point (a bad input found late, a full disk, Ctrl-C, a kill) must leave no half-written
output and an earlier output at the same path untouched (README, "Errors"). Written files and directories get
the modes a plain ``open``/``mkdir`` would give under the user's umask (0644 / 0755 under 022), not the 0600 of
``tempfile``: outputs are meant to be shared.

- :func:`atomic_write`: one file.
- :func:`write_directory_atomically`: a whole directory (an artifact), swapped in with two renames; a temp
  left by a killed writer (``.NAME.<pid>.<random>.tmp|old``) is removed by the next writer to the same output
  once that process is gone.
- :class:`WriteError`: a failed write as one line naming the user's output, never a temp path.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from massmerge.errors import CheckpointError


class WriteError(CheckpointError, OSError):
    """A failed write (disk full, quota, read-only file system) as one line naming the user's output path.

    Also an :class:`OSError` carrying the original ``errno``, so library callers that catch ``OSError`` (or
    test ``errno == ENOSPC``) keep working; the CLI reports it as a :class:`MassMergeError` line.
    """

    @classmethod
    def of(cls, path: Path | str, exc: BaseException, *, what: str = "",
           tail: str = "the previous file, if any, is unchanged") -> WriteError:
        """``PATH: cannot write [WHAT] (REASON); TAIL`` from the low-level error ``exc``."""
        error = cls(f"{path}: cannot write{' ' + what if what else ''} ({write_error_reason(exc)}); {tail}")
        error.errno = getattr(exc, "errno", None) or errno.EIO
        error.strerror = write_error_reason(exc)
        return error

    def __str__(self) -> str:  # OSError would print "[Errno 28] ..." once errno is set
        return str(self.args[0]) if self.args else super().__str__()


def short_reason(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), or its type's name."""
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def write_error_reason(exc: BaseException) -> str:
    """The reason of a failed write in the words of the OS: safetensors says ``Error while serializing: I/O
    error: No space left on device (os error 28)``, Python ``[Errno 28] No space left on device``."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = short_reason(exc)
    match = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", text)
    return match.group(1) if match else text


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it; the lock keeps two readers from racing)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def fsync_file(path: Path) -> None:
    """Flush a written file to the disk before it is renamed into place."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_path)`` then rename tmp onto ``path``; on any failure remove tmp and re-raise.

    The file gets the mode a plain ``open(path, "w")`` would give (0666 less the umask, so 0644 under umask
    022), not the 0600 of ``tempfile.mkstemp``: a merged model is a file to share, not a secret. A failed
    write into the temp file (disk full, quota, read-only file system) is a :class:`WriteError` naming
    ``path``, not the temp file the user never asked for.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, WriteError) or exc.errno is None or exc.filename not in (None, tmp_name):
            raise  # not a write into the temp file (e.g. an input that failed to read): its own message
        raise WriteError.of(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    """A UTF-8 text file (a report, a JSON record), written atomically."""
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----- directories --------------------------------------------------------------------------------------------

def apply_umask(root: Path) -> None:
    """Give a finished temp directory the modes a plain ``mkdir``/``open`` would (0755 / 0644 under umask 022):
    an artifact is meant to be served by another account, not kept private like a ``mkdtemp`` directory."""
    mask = current_umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def temps_of(directory: Path) -> list[tuple[Path, str, int | None]]:
    """(path, "tmp" | "old", pid or None) of the temp directories a writer of ``directory`` makes
    (``.NAME.<pid>.<random>.tmp|old``; ``.NAME.<random>.tmp`` from massmerge before 0.2, without a pid)."""
    pattern = re.compile(rf"\.{re.escape(directory.name)}\.(?:(\d+)\.)?[a-z0-9_]+\.(tmp|old)")
    found = []
    for path in sorted(directory.parent.glob(f".{glob.escape(directory.name)}.*")):
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink():
            found.append((path, match.group(2), int(match.group(1)) if match.group(1) else None))
    return found


def _alive(pid: int | None) -> bool:
    """Whether process ``pid`` still runs on this machine (None: a temp from before pids were recorded)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_temps(directory: Path) -> None:
    """Clean up after an earlier writer of the same output that was killed (SIGKILL, power loss) mid-write.

    Its ``.tmp`` directory is removed once that process is gone (a concurrent writer's is left alone). An
    ``.old`` directory still holding the previous output means the kill came between the two renames of the
    swap: that output is put back first when nothing has taken its place.
    """
    for path, kind, pid in temps_of(directory):
        if _alive(pid):
            continue
        kept = path / "artifact"
        if kind == "old" and kept.is_dir() and not kept.is_symlink() and not os.path.lexists(directory):
            os.replace(kept, directory)
        shutil.rmtree(path, ignore_errors=True)


def _temp_dir(directory: Path, suffix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{directory.name}.{os.getpid()}.", suffix=suffix, dir=directory.parent))


def is_write_failure(exc: BaseException, tmp: Path) -> bool:
    """Whether ``exc`` is a failed write into ``tmp`` (a full disk, a quota, a read-only file system), not a
    failed read of an input: safetensors reports these as ``SafetensorError``, Python as ``OSError``."""
    if type(exc).__name__ == "SafetensorError":  # safetensors' write errors, without importing it here
        return True
    if isinstance(exc, OSError) and exc.errno is not None:
        name = str(exc.filename) if exc.filename is not None else None
        return name is None or Path(name) == tmp or tmp in Path(name).parents
    return False


def write_directory_atomically(directory: Path, fill: Callable[[Path], None], *, what: str = "the artifact") -> None:
    """Run ``fill(tmp_dir)`` in a temp dir next to ``directory`` and swap it into place.

    A failure leaves no half-written ``directory``; an existing one there is replaced only once the new one is
    complete (callers check first that it may be replaced). A failed write (disk full) is one
    :class:`WriteError` naming ``directory`` (``what`` says what was being written).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(directory)
    tmp = _temp_dir(directory, ".tmp")
    old: Path | None = None
    try:
        try:
            fill(tmp)
            apply_umask(tmp)
        except Exception as exc:
            if not is_write_failure(exc, tmp):
                raise
            raise WriteError.of(directory, exc, what=what, tail="the previous contents are unchanged") from None
        if directory.exists():
            old = _temp_dir(directory, ".old")
            os.replace(directory, old / "artifact")
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "artifact").exists() and not directory.exists():
            os.replace(old / "artifact", directory)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


__all__ = ["WriteError", "apply_umask", "atomic_write", "current_umask", "fsync_file", "is_write_failure",
           "remove_stale_temps", "short_reason", "temps_of", "write_directory_atomically", "write_error_reason",
           "write_text_atomically"]
