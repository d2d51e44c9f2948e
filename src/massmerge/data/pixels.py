"""Preprocessed test images for every pass of an evaluation: decoded in worker processes, once per run.

Why (issue 27): an evaluation makes about a dozen passes over the test sets (zero-shot, each expert, each merge,
MASS served, task given, batch routing); decoding and resizing a 224x224 image costs 1-2 ms on one core, so the
passes would spend hours of CPU there. Here the images of a split are decoded and preprocessed by a
``torch.utils.data.DataLoader`` with ``workers`` processes, in order, a batch at a time; with a cache folder the
first pass writes each image's pixels as uint8 (``[3, crop, crop]``, 147 KiB at 224: a quarter of float32) to one
file keyed by the dataset, its items and the transform, and every later pass (and a resumed run) reads batches
back with positioned reads. Nothing is memory-mapped and nothing holds a split: the pages read stay in the OS's
file cache, not in the process, so peak RSS does not grow with the test set.

The cached pixels are exactly the transform's output: uint8 values are recovered from the normalized floats and
checked, on the first batch, to normalize back bit for bit; a transform for which that fails is not cached.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from massmerge.io.atomic import fsync_file

Transform = Callable[[Any], torch.Tensor]


def default_workers() -> int:
    """Decoding processes when the config sets none: one per core but one (the main process runs the model),
    at most 8; 0 (decode in the main process) on a single core."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class _Decoded(torch.utils.data.Dataset):
    """Item ``i`` of an image dataset, decoded and preprocessed (what a worker process runs)."""

    def __init__(self, keys: Sequence[Any], load: Callable[[Any], Any], preprocess: Transform) -> None:
        self.keys, self.load, self.preprocess = list(keys), load, preprocess

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(self.load(self.keys[index]))


def decoded_batches(keys: Sequence[Any], load: Callable[[Any], Any], preprocess: Transform, batch_size: int,
                    workers: int) -> Iterator[torch.Tensor]:
    """Preprocessed images ``[B, 3, H, W]`` of ``keys`` in order, decoded by ``workers`` processes (0: here)."""
    dataset = _Decoded(keys, load, preprocess)
    if workers <= 0 or len(keys) <= batch_size:
        for start in range(0, len(keys), batch_size):
            yield torch.stack([dataset[i] for i in range(start, min(start + batch_size, len(keys)))])
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=torch.stack, prefetch_factor=2)
    yield from loader


class PixelCache:
    """One split's preprocessed images as uint8 in one file (``N x 3 x crop x crop`` bytes, row-major)."""

    def __init__(self, path: Path, count: int, shape: tuple[int, int, int], mean: Sequence[float],
                 std: Sequence[float]) -> None:
        self.path, self.count, self.shape = path, count, shape
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def row_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]

    @property
    def complete(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size == self.count * self.row_bytes

    def to_uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        """The uint8 values that normalize to ``pixels`` (the transform's output)."""
        return ((pixels.float() * self.std + self.mean) * 255.0).round().clamp(0, 255).to(torch.uint8)

    def normalize(self, data: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` -> the transform's float output: ``(x / 255 - mean) / std``, its own order."""
        return (data.float() / 255.0 - self.mean) / self.std

    def exact(self, pixels: torch.Tensor) -> bool:
        """True when ``pixels`` survive the uint8 round trip bit for bit (the cache changes no result)."""
        return tuple(pixels.shape[1:]) == self.shape and torch.equal(self.normalize(self.to_uint8(pixels)), pixels)

    def write(self, batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Pass ``batches`` through while writing them; the file appears (renamed into place) only when all were
        written and every one was exact. A pass not run to its end leaves no file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        ok = True
        try:
            with open(tmp, "wb") as handle:
                for batch in batches:
                    if ok and self.exact(batch):
                        handle.write(self.to_uint8(batch).numpy().tobytes())
                    else:
                        ok = False
                    yield batch
            if ok:
                fsync_file(tmp)
                os.replace(tmp, self.path)  # the whole file or none: readers check its size too
        finally:
            tmp.unlink(missing_ok=True)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The cached split in order, ``batch_size`` images at a time, normalized as the transform does."""
        with open(self.path, "rb") as handle:
            for start in range(0, self.count, batch_size):
                rows = min(batch_size, self.count - start)
                data = bytearray(rows * self.row_bytes)
                handle.seek(start * self.row_bytes)
                handle.readinto(data)
                yield self.normalize(torch.frombuffer(data, dtype=torch.uint8).view(rows, *self.shape))


def split_batches(keys: Sequence[Any], load: Callable[[Any], Any], preprocess: Transform, batch_size: int, *,
                  workers: int, cache: PixelCache | None) -> Iterator[torch.Tensor]:
    """One pass over a split: from the cache when it is complete, else decoded by the workers (and, with a
    cache, written to it on the way, for the next pass)."""
    if cache is not None and cache.complete:
        return cache.batches(batch_size)
    decoded = decoded_batches(keys, load, preprocess, batch_size, workers)
    return cache.write(decoded) if cache is not None else decoded


__all__ = ["PixelCache", "decoded_batches", "default_workers", "split_batches"]
