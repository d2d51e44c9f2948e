"""Give freed memory back to the operating system while experts stream through (glibc; a no-op elsewhere).

Why: reducing one expert to its factors allocates and frees hundreds of MiB of temporaries of many sizes
(task-vector tensors, SVD workspaces). glibc keeps freed chunks in its per-thread arenas and raises its mmap
threshold each time a large block is freed, so a build's resident memory crept up by ~40 MiB per expert
(MiniLM, T = 20: 1.1 GiB of growth for 110 MiB of live factors; ``bench/merge_memory.py``) although what the
code holds stays flat. Trimming after each expert, and (for the process that owns the allocator: the CLI)
a fixed mmap threshold in the commands that stream experts, keep peak RSS flat in T.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
STREAMING_MMAP_THRESHOLD = 256 * 1024


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def release_freed_memory() -> bool:
    """Return freed heap pages to the OS (``malloc_trim(0)``); False where that is not available."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0) in (0, 1))


def tune_allocator_for_streaming(threshold: int = STREAMING_MMAP_THRESHOLD) -> bool:
    """Serve blocks >= ``threshold`` bytes by mmap (returned on free) instead of letting glibc raise the
    threshold as it sees large frees. Process-wide: called by the commands that stream experts (``merge``,
    ``build``), never on import of the library, and not by ``predict``: there every activation of a forward
    would be a fresh mmap, page-faulted and unmapped, which cost 25% of ``massmerge predict``'s wall time
    (5.6 of 22 CPU-s in the kernel for 1,024 texts, against 1.8 without)."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1)


__all__ = ["release_freed_memory", "tune_allocator_for_streaming"]
