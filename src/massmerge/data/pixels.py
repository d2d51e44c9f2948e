"""Preprocessed test images for every pass of an evaluation: decoded in worker processes, once per run.

Why (issue 27): an evaluation makes about a dozen passes over the test sets (zero-shot, each expert, each merge,
MASS served, task given, batch routing); decoding and resizing a 224x224 image costs 1-2 ms on one core, so the
passes would spend hours of CPU there. Here the images of a split are decoded and preprocessed by a
``torch.utils.data.DataLoader`` with ``workers`` processes, in order, a batch at a time; with a cache folder the
first pass writes each image's pixels as uint8 (``[3, crop, crop]``, 147 KiB at 224: a quarter of float32) to one
file keyed by the dataset, its items and the transform, and every later pass (and a resumed run) reads batches
back with positioned reads. Nothing is memory-mapped and nothing holds a split: the pages read stay in the OS's
file cache, not in the process, so peak RSS does not grow with the test set.

The cached pixels are exactly the transform's: a transform with a uint8 half and a float half (CLIP's
``Preprocess.to_uint8`` and ``normalize``) runs the first in the workers and the cache, the second on each batch
(elementwise, so batched is bit for bit per image); for a plain callable, the float output is mapped back to uint8
and cached only if every batch normalizes back bit for bit.
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


def uint8_halves(preprocess: Any) -> tuple[Transform, Callable[[torch.Tensor], torch.Tensor]] | None:
    """The transform's geometric half (image -> uint8 ``[3, H, W]``) and arithmetic half (uint8 ``[..., 3, H, W]``
    -> float), when it has them (CLIP's ``Preprocess.to_uint8`` / ``normalize``); None for a plain callable."""
    to_uint8, normalize = getattr(preprocess, "to_uint8", None), getattr(preprocess, "normalize", None)
    return (to_uint8, normalize) if callable(to_uint8) and callable(normalize) else None


class PixelCache:
    """One split's preprocessed images as uint8 in one file (``N x 3 x crop x crop`` bytes, row-major).

    With a transform that has uint8 halves (:func:`uint8_halves`) the workers return uint8 and the file holds it
    as is; otherwise the float output is mapped back to uint8 with the transform's mean and std and written only
    if every batch normalizes back bit for bit."""

    def __init__(self, path: Path, count: int, shape: tuple[int, int, int], preprocess: Any) -> None:
        self.path, self.count, self.shape = path, count, shape
        self.halves = uint8_halves(preprocess)
        mean, std = getattr(preprocess, "mean", (0.0, 0.0, 0.0)), getattr(preprocess, "std", (1.0, 1.0, 1.0))
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def row_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]

    @property
    def complete(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size == self.count * self.row_bytes

    def to_uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        """The uint8 values that normalize to ``pixels`` (a transform without a uint8 half)."""
        return ((pixels.float() * self.std + self.mean) * 255.0).round().clamp(0, 255).to(torch.uint8)

    def normalize(self, data: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` -> the transform's float output: its own arithmetic half, else
        ``(x / 255 - mean) / std``."""
        return self.halves[1](data) if self.halves else (data.float() / 255.0 - self.mean) / self.std

    def exact(self, pixels: torch.Tensor) -> bool:
        """True when ``pixels`` survive the uint8 round trip bit for bit (the cache changes no result)."""
        return tuple(pixels.shape[1:]) == self.shape and torch.equal(self.normalize(self.to_uint8(pixels)), pixels)

    def write(self, batches: Iterator[torch.Tensor], *, uint8: bool = False) -> Iterator[torch.Tensor]:
        """Pass ``batches`` through while writing them (``uint8``: as they are; else float batches mapped back
        and checked); the file appears (renamed into place) only when every batch was written. A pass not run
        to its end, or a float batch that does not survive the round trip, leaves no file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        ok = True
        try:
            with open(tmp, "wb") as handle:
                for batch in batches:
                    ok = ok and tuple(batch.shape[1:]) == self.shape and (uint8 or self.exact(batch))
                    if ok:
                        handle.write((batch if uint8 else self.to_uint8(batch)).contiguous().numpy().tobytes())
                    yield batch
            if ok:
                fsync_file(tmp)
                os.replace(tmp, self.path)  # the whole file or none: readers check its size too
        finally:
            tmp.unlink(missing_ok=True)

    def read(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The cached split in order as uint8 ``[B, 3, H, W]``, ``batch_size`` images at a time (positioned reads:
        nothing is mapped, so the pages stay in the OS's file cache, not in this process)."""
        with open(self.path, "rb") as handle:
            for start in range(0, self.count, batch_size):
                rows = min(batch_size, self.count - start)
                data = bytearray(rows * self.row_bytes)
                handle.seek(start * self.row_bytes)
                handle.readinto(data)
                yield torch.frombuffer(data, dtype=torch.uint8).view(rows, *self.shape)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The cached split in order, normalized as the transform does."""
        return (self.normalize(data) for data in self.read(batch_size))


def split_batches(keys: Sequence[Any], load: Callable[[Any], Any], preprocess: Transform, batch_size: int, *,
                  workers: int, cache: PixelCache | None) -> Iterator[torch.Tensor]:
    """One pass over a split, float batches in order: from the cache when it is complete, else decoded by the
    workers (as uint8 when the transform has halves, normalized here) and, with a cache, written on the way."""
    if cache is not None and cache.complete:
        return cache.batches(batch_size)
    halves = uint8_halves(preprocess)
    if halves is None:
        decoded = decoded_batches(keys, load, preprocess, batch_size, workers)
        return cache.write(decoded) if cache is not None else decoded
    data = decoded_batches(keys, load, halves[0], batch_size, workers)
    return (halves[1](batch) for batch in (cache.write(data, uint8=True) if cache is not None else data))


__all__ = ["PixelCache", "decoded_batches", "default_workers", "split_batches", "uint8_halves"]
