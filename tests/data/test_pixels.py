"""Test images decoded by worker processes and cached as uint8 (issue 27, item 5): the same pixels, bit for bit and
in order, from the main process, from workers and from the cache; a later pass decodes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hub_fixtures import tiny_images

from massmerge.data.images import Preprocess
from massmerge.data.pixels import PixelCache, decoded_batches, split_batches

PRE = Preprocess(16, 16)


def _images(count: int = 10) -> list:
    return tiny_images(count, seed=3)  # RGB non-square, grayscale and square in turn


def _cache(tmp_path: Path, count: int) -> PixelCache:
    return PixelCache(tmp_path / "px" / "split.u8", count, (3, PRE.crop, PRE.crop), PRE)


def _fail(_: object) -> None:
    raise AssertionError("decoded although the cache is complete")


def test_workers_and_the_cache_give_the_transform_output_bit_for_bit(tmp_path: Path) -> None:
    images = _images()
    expected = torch.stack([PRE(image) for image in images])
    keys = list(range(len(images)))
    for workers in (0, 2):
        got = torch.cat(list(decoded_batches(keys, images.__getitem__, PRE, 4, workers)))
        assert torch.equal(got, expected), workers
    cache = _cache(tmp_path, len(images))
    first = torch.cat(list(split_batches(keys, images.__getitem__, PRE, 4, workers=2, cache=cache)))
    assert torch.equal(first, expected) and cache.complete
    assert cache.path.stat().st_size == len(images) * 3 * 16 * 16  # uint8: a quarter of float32
    again = torch.cat(list(split_batches(keys, _fail, PRE, 3, workers=0, cache=cache)))
    assert torch.equal(again, expected)


def test_an_unfinished_pass_or_an_inexact_transform_leaves_no_cache(tmp_path: Path) -> None:
    images = _images()
    keys = list(range(len(images)))
    cache = _cache(tmp_path, len(images))
    stream = split_batches(keys, images.__getitem__, PRE, 4, workers=0, cache=cache)
    next(stream)
    stream.close()
    assert not cache.complete and list((tmp_path / "px").iterdir()) == []

    def shifted(image: object) -> torch.Tensor:
        return PRE(image) + 1e-3  # not a normalized uint8 image: the cache would change results

    out = torch.cat(list(split_batches(keys, images.__getitem__, shifted, 4, workers=0, cache=cache)))
    assert torch.equal(out, torch.stack([shifted(i) for i in images])) and not cache.complete


@pytest.mark.parametrize("workers", [0, 1])
def test_parquet_rows_through_workers(tmp_path: Path, workers: int) -> None:
    from hub_fixtures import write_parquet

    from massmerge.data.images import load_image_dataset

    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", ["a", "b"], 7, seed=4)
    data = load_image_dataset(str(tmp_path), split="test")
    keys = [key for key, _ in data.items]
    got = torch.cat(list(decoded_batches(keys, data.loader, PRE, 3, workers)))
    assert torch.equal(got, torch.stack(list(data.pixels(PRE))))


class Halves:
    """A transform with a uint8 half and a float half, as CLIP's Preprocess has them (resize, then rescale in
    float64 and normalize in float32)."""

    crop, mean, std = 12, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

    def to_uint8(self, image: object) -> torch.Tensor:
        rgb = image.convert("RGB").resize((self.crop, self.crop))
        return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(self.crop, self.crop, 3).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        scaled = (pixels.to(torch.float64) * (1 / 255)).to(torch.float32)
        return (scaled - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)

    def __call__(self, image: object) -> torch.Tensor:
        return self.normalize(self.to_uint8(image))


def test_a_transform_with_uint8_halves_caches_its_uint8_half(tmp_path: Path) -> None:
    images, pre = _images(), Halves()
    keys = list(range(len(images)))
    expected = torch.stack([pre(image) for image in images])
    cache = PixelCache(tmp_path / "h.u8", len(images), (3, 12, 12), pre)
    for workers in (0, 2):
        got = torch.cat(list(split_batches(keys, images.__getitem__, pre, 4, workers=workers, cache=None)))
        assert torch.equal(got, expected), workers
    first = torch.cat(list(split_batches(keys, images.__getitem__, pre, 4, workers=1, cache=cache)))
    assert torch.equal(first, expected) and cache.complete
    stored = torch.frombuffer(bytearray(cache.path.read_bytes()), dtype=torch.uint8).view(-1, 3, 12, 12)
    assert torch.equal(stored, torch.stack([pre.to_uint8(image) for image in images]))
    again = torch.cat(list(split_batches(keys, _fail, pre, 3, workers=0, cache=cache)))
    assert torch.equal(again, expected)
