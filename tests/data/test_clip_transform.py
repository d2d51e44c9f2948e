"""CLIP's eval transform (``data.images.Preprocess``) equals ``transformers.CLIPImageProcessor`` bit for bit.

The reference is the real processor, built offline from a ``preprocessor_config.json`` written here (the one the
openai/clip-vit-base-patch32 repo holds, and variants), on square and non-square images in RGB, L, LA, RGBA and
P (with and without transparency). Without torchvision, transformers builds its PIL backend
(``CLIPImageProcessorPil``); that is the path FusionBench's experts were scored with (transformers 4's
``CLIPImageProcessor`` is PIL + NumPy).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from massmerge.data.images import Preprocess
from massmerge.errors import OptionError

#: openai/clip-vit-base-patch32's preprocessor_config.json (transformers 4 format: sizes as ints)
OPENAI_B32 = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}
#: the transformers 5 spelling of the same, at another size (dict sizes, explicit rescale factor)
DICT_SIZES = {**OPENAI_B32, "size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64},
              "rescale_factor": 0.00392156862745098}
#: a crop larger than the resized image: CLIPImageProcessor pads with zeros
CROP_ABOVE_SIZE = {**OPENAI_B32, "size": 40, "crop_size": 48}

SIZES = [(224, 224), (300, 200), (200, 300), (225, 301), (301, 225), (97, 131), (50, 40), (640, 481), (33, 33)]
MODES = ["RGB", "L", "LA", "RGBA", "P", "P-transparent"]


def _image(size: tuple[int, int], mode: str, seed: int) -> Image.Image:
    gen = np.random.default_rng(seed)
    w, h = size
    rgba = Image.fromarray(gen.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P-transparent":
        image = rgba.convert("RGB").quantize(16)
        image.info["transparency"] = 3
        return image
    if mode == "P":
        return rgba.convert("RGB").quantize(16)
    return rgba.convert(mode) if mode in ("L", "LA", "RGB") else rgba


def _processor(tmp_path: Path, config: dict):
    from transformers import CLIPImageProcessor

    folder = tmp_path / "proc"
    folder.mkdir(exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CLIPImageProcessor.from_pretrained(str(folder)), Preprocess.from_model_dir(folder)


def _reference(processor, image: Image.Image) -> torch.Tensor:
    return torch.as_tensor(np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]))


@pytest.mark.parametrize("config", [OPENAI_B32, DICT_SIZES, CROP_ABOVE_SIZE], ids=["openai", "dict-sizes", "pad"])
def test_equals_clip_image_processor_bit_for_bit(tmp_path: Path, config: dict) -> None:
    processor, ours = _processor(tmp_path, config)
    for seed, size in enumerate(SIZES):
        for mode in MODES:
            image = _image(size, mode, seed)
            expected, got = _reference(processor, image), ours(image)
            assert got.dtype == torch.float32 and got.shape == expected.shape, (size, mode)
            assert torch.equal(got, expected), f"{size} {mode}: max diff {(got - expected).abs().max():.3g}"


def test_the_longer_side_is_truncated_not_rounded() -> None:
    """225 x 301 to a shorter side of 224: 224 * 301 / 225 = 299.66, so 299 (rounding gave 300)."""
    ours = Preprocess()
    assert ours.resized_size(225, 301) == (224, 299)
    assert ours.resized_size(301, 225) == (299, 224)
    assert ours.resized_size(300, 200) == (336, 224)


def test_uint8_half_and_float_half_compose_to_the_transform() -> None:
    ours = Preprocess(size=32, crop=32)
    image = _image((40, 57), "RGB", 7)
    pixels = ours.to_uint8(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)
    assert torch.equal(ours.normalize(pixels), ours(image))
    assert torch.equal(ours.normalize(pixels[None])[0], ours(image))  # batched: same values


@pytest.mark.parametrize(("field", "value"), [("do_center_crop", False), ("do_normalize", False),
                                              ("crop_size", {"height": 224, "width": 200})])
def test_a_setting_it_cannot_honour_is_one_line(tmp_path: Path, field: str, value: object) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "preprocessor_config.json").write_text(json.dumps({**OPENAI_B32, field: value}))
    with pytest.raises(OptionError, match=rf"preprocessor_config.json: field '{field}'") as info:
        Preprocess.from_model_dir(folder)
    assert "\n" not in str(info.value)
