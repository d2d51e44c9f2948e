"""Image classification test sets for ``massmerge evaluate``: local image folders or HF datasets.

Why our own preprocessing: torchvision cannot be installed beside our torch, and CLIP's eval transform is
small (resize the shorter side with bicubic, center crop, scale to [0, 1], normalize); its sizes and statistics
are read from the model's ``preprocessor_config.json`` when present, else CLIP's defaults.

Label order (design.md section 4): a folder dataset's classes follow the task's class names when the folder
names match them, else sorted folder names; an HF dataset's labels are its ``ClassLabel`` order. The heads
must use the same order, which :func:`check_label_space` verifies by count.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from massmerge.data.datafiles import IMAGE_SUFFIXES, SplitFiles, read_parquet, read_webdataset, resolve_split
from massmerge.errors import MassMergeError, OptionError
from massmerge.io.inputs import describe, read_utf8_lines
from massmerge.io.jsonfile import read_json_file

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, CLIP's resample
RESCALE = 1 / 255  # uint8 -> [0, 1], CLIPImageProcessor's rescale_factor


@dataclass(frozen=True)
class Preprocess:
    """CLIP's eval transform, exactly as ``transformers.CLIPImageProcessor`` computes it (its PIL path).

    RGB (transparency composited onto white), the shorter side resized to ``size`` with the longer side's length
    truncated (``int(size * long / short)``, as CLIPImageProcessor and torchvision do; rounding it moved half of
    the non-square images by one pixel), PIL ``resample`` (3: bicubic), a centre crop ``crop`` (zero padding where
    the image is smaller), ``uint8 * rescale`` in float64 cast to float32, then ``(x - mean) / std`` in float32.
    ``exact``: ``size`` is a fixed square (a config's ``{"height", "width"}`` size), not the shorter side.
    """

    size: int = 224
    crop: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resample: int = BICUBIC
    rescale: float = RESCALE
    exact: bool = False

    @classmethod
    def from_model_dir(cls, path: Path | None, *, image_size: int | None = None) -> Preprocess:
        """Read ``preprocessor_config.json`` (HF) if the model directory has one, else use the model's image size."""
        file = path / "preprocessor_config.json" if path is not None and path.is_dir() else None
        if file is None or not file.is_file():
            return cls(image_size, image_size) if image_size else cls()
        cfg = read_json_file(file, "a preprocessor config")
        return cls.from_config(cfg if isinstance(cfg, dict) else {}, name=str(file))

    @classmethod
    def from_config(cls, cfg: dict[str, Any], *, name: str = "preprocessor config") -> Preprocess:
        """The transform a ``preprocessor_config.json`` mapping describes; a setting it cannot honour exactly
        (a step switched off, a non-square size or crop) is refused in one line naming the field."""
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if cfg.get(flag, True) is not True:
                raise OptionError(f"{name}: field '{flag}' is {cfg[flag]!r}; massmerge runs CLIP's full eval transform")
        size, exact = _edge(cfg.get("size"), 224, name, "size")
        crop, _ = _edge(cfg.get("crop_size"), size, name, "crop_size")
        return cls(size, crop, tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD)),
                   int(cfg.get("resample", BICUBIC)), float(cfg.get("rescale_factor", RESCALE)), exact)

    def __call__(self, image: Any) -> torch.Tensor:
        """PIL image -> float tensor [3, crop, crop]."""
        return self.normalize(self.to_uint8(image))

    def to_uint8(self, image: Any) -> torch.Tensor:
        """The geometric half: PIL image -> uint8 tensor [3, crop, crop] (RGB, resized, centre-cropped); what a
        decoded-image cache can hold at a quarter of the float size."""
        image = to_rgb(image)
        image = image.resize(self.resized_size(*image.size), resample=self.resample)
        w, h = image.size
        left, top = (w - self.crop) // 2, (h - self.crop) // 2
        image = image.crop((left, top, left + self.crop, top + self.crop))  # outside the image: zeros, as HF pads
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(self.crop, self.crop, 3)
        return data.permute(2, 0, 1).contiguous()

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize: the shorter side ``size``, the longer one truncated, not rounded."""
        if self.exact:
            return self.size, self.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)
        return (self.size, new_long) if width <= height else (new_long, self.size)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """The arithmetic half: uint8 ``[..., 3, H, W]`` -> float32, as HF computes it (rescale in float64, then
        mean and std in float32), on the tensor's own device."""
        scaled = (pixels.to(torch.float64) * self.rescale).to(torch.float32)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        return (scaled - mean) / std


def to_rgb(image: Any) -> Any:
    """A PIL image as RGB the way CLIPImageProcessor converts it: any transparency (an alpha band, or a palette
    or grayscale image's ``transparency``) composited onto white, every other mode converted directly."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _edge(value: Any, default: int, name: str, field_name: str) -> tuple[int, bool]:
    """(edge, exact) of a config's ``size`` / ``crop_size``: an int or ``shortest_edge`` is the shorter side, a
    ``{"height", "width"}`` square a fixed size."""
    if isinstance(value, int):
        return value, False
    if isinstance(value, dict):
        if value.get("shortest_edge"):
            return int(value["shortest_edge"]), False
        if value.get("height") and value.get("width"):
            if value["height"] != value["width"]:
                raise OptionError(f"{name}: field '{field_name}' is not square ({value}); massmerge crops squares")
            return int(value["height"]), True
    return default, False


def image_size_of(module: Any) -> int | None:
    """The input image size a vision model records (an HF CLIP config, or an open_clip ``visual``), else None."""
    base = getattr(module, "model", module)
    config = getattr(base, "config", None)
    vision = getattr(config, "vision_config", config)
    size = getattr(vision, "image_size", None) or getattr(getattr(base, "visual", None), "image_size", None)
    return size[0] if isinstance(size, (tuple, list)) else size


def preprocess_for(module: Any, model_dir: Path | None) -> Preprocess:
    """The base's own eval transform (``preprocessor_config.json``), else CLIP's at the model's image size."""
    return Preprocess.from_model_dir(model_dir, image_size=image_size_of(module))


def read_image_paths(path: Path) -> list[Path]:
    """An image, the images under a directory (sorted), or the paths listed in a text file (one per line)."""
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise MassMergeError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this directory")
        return found
    if not path.is_file():
        raise MassMergeError(f"{path}: {describe(path)}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [path]
    listed = [line.strip() for _, line in read_utf8_lines(path) if line.strip()]
    paths = [(path.parent / line) if not Path(line).is_absolute() else Path(line) for line in listed]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MassMergeError(f"{path}: listed image '{missing[0]}' does not exist ({len(missing)} missing)")
    return paths



@dataclass
class ImageDataset:
    """A list of (image loader, label) with its class names, in label order."""

    name: str
    classes: list[str]
    items: list[tuple[Any, int]] = field(default_factory=list)  # (path, or a key for ``loader``; label)
    loader: Callable[[Any], Any] | None = None  # key -> PIL image; None: items hold paths or images

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, max_samples: int | None, seed: int = 0) -> ImageDataset:
        """A seeded random subset of at most ``max_samples`` items (all of them when None)."""
        if max_samples is None or max_samples >= len(self.items):
            return self
        order = list(range(len(self.items)))
        random.Random(seed).shuffle(order)
        return ImageDataset(self.name, self.classes, [self.items[i] for i in sorted(order[:max_samples])], self.loader)

    def pixels(self, preprocess: Preprocess) -> Iterator[torch.Tensor]:
        """Each image preprocessed [3, H, W], in order, one at a time."""
        load = self.loader or open_image
        for item, _ in self.items:
            yield preprocess(load(item))

    def labels(self) -> torch.Tensor:
        """Every item's label [N], in order."""
        return torch.tensor([label for _, label in self.items], dtype=torch.long)

    def batches(self, preprocess: Preprocess, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(pixel_values [B, 3, H, W], labels [B]) in order."""
        for start in range(0, len(self.items), batch_size):
            chunk = self.items[start:start + batch_size]
            load = self.loader or open_image
            pixels = torch.stack([preprocess(load(item)) for item, _ in chunk])
            yield pixels, torch.tensor([label for _, label in chunk], dtype=torch.long)


def image_collate(pixels: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Preprocessed images [3, H, W] as one batch ``{"pixel_values": [B, 3, H, W]}`` (what vision adapters read)."""
    return {"pixel_values": torch.stack(list(pixels))}


def open_image(item: Any) -> Any:
    """A PIL image from a path (a one-line error naming an unreadable file), or the item itself."""
    if isinstance(item, (str, Path)):
        from PIL import Image

        try:
            with Image.open(item) as image:
                return image.copy()
        except OSError as exc:
            raise MassMergeError(f"{item}: not a readable image ({exc})") from None
    return item


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def load_image_folder(root: str | Path, classnames: Sequence[str] | None = None, *, name: str | None = None) -> ImageDataset:
    """``root/<class>/<image>`` folders. With ``classnames`` the folders are matched to them (ignoring case and
    punctuation) and labelled in that order; otherwise labels follow the sorted folder names."""
    root = Path(root)
    if not root.is_dir():
        raise MassMergeError(f"{root}: no such image folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise MassMergeError(f"{root}: no class sub-folders (expected {root}/<class>/<image>)")
    order = _folder_order(root, folders, classnames)
    items = [(str(f), label) for label, folder in enumerate(order) for f in sorted(folder.rglob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise MassMergeError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    classes = list(classnames) if classnames is not None and len(order) == len(classnames) else [f.name for f in order]
    return ImageDataset(name or root.name, classes, items)


def _folder_order(root: Path, folders: list[Path], classnames: Sequence[str] | None) -> list[Path]:
    by_name = {_norm(f.name): f for f in folders}
    if classnames is None or not all(_norm(c) in by_name for c in classnames):
        return folders
    if len(folders) != len(classnames):
        raise MassMergeError(f"{root}: {len(folders)} class folders but the task has {len(classnames)} classes")
    return [by_name[_norm(c)] for c in classnames]


def load_hf_image_dataset(spec: str, *, split: str = "test", revision: str | None = None, subset: str | None = None,
                          image_column: str | None = None, label_column: str | None = None,
                          classnames: Sequence[str] | None = None) -> ImageDataset:
    """One split of one config of an HF dataset (hub id or local directory): only its files are fetched
    (:func:`~massmerge.data.datafiles.resolve_split`) and read, parquet a row group at a time and webdataset
    shards by member offset. Other formats (arrow, csv, json, loading scripts) go through ``datasets``."""
    found = resolve_split(spec, split=split, config=subset, revision=revision)
    kinds = {f.suffix.lower() for f in found.files}
    if kinds <= set(IMAGE_SUFFIXES):
        return load_image_folder(_common_folder(found), classnames, name=spec)
    if kinds == {".parquet"}:
        table = read_parquet(found, image_column, label_column)
    elif kinds == {".tar"}:
        table = read_webdataset(found, image_column, label_column)
    else:
        return _load_with_datasets(spec, found, image_column, label_column)
    return ImageDataset(spec, table.classes, [(row, label) for row, label in enumerate(table.labels)], table.loader)


def _common_folder(found: SplitFiles) -> Path:
    """The ``<split>`` folder of an image-folder split (``test/<class>/<image>``): the files' grandparent."""
    parents = {f.parent.parent for f in found.files}
    if len(parents) != 1:
        raise MassMergeError(f"{found.where}: images are not laid out as <split>/<class>/<image>")
    return parents.pop()


def _load_with_datasets(spec: str, found: SplitFiles, image_column: str | None, label_column: str | None
                        ) -> ImageDataset:
    try:
        from datasets import load_dataset
    except ImportError:
        raise MassMergeError(
            f"dataset '{spec}': its {found.files[0].suffix} files need `pip install datasets`; or export it as an "
            "image folder") from None
    builder = {".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}.get(found.files[0].suffix.lower())
    try:
        data = load_dataset(builder, data_files={found.split: [str(f) for f in found.files]}, split=found.split)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise MassMergeError(f"{found.where}: cannot load ({str(exc).splitlines()[0][:160]})") from None
    image_col = image_column or _pick_column(data, ("image", "img", "jpg", "png"), spec)
    label_col = label_column or _pick_column(data, ("label", "labels", "fine_label", "cls"), spec)
    feature = data.features.get(label_col)
    classes = list(getattr(feature, "names", None) or sorted({int(v) for v in data[label_col]}))
    items = [(index, int(label)) for index, label in enumerate(data[label_col])]  # images decoded lazily
    return ImageDataset(spec, [str(c) for c in classes], items, loader=lambda index: data[index][image_col])


def _pick_column(data: Any, names: Sequence[str], spec: str) -> str:
    for name in names:
        if name in data.column_names:
            return name
    raise OptionError(
        f"dataset '{spec}': none of the columns {list(names)} exists (has {data.column_names}); "
        "set image_column/label_column"
    )


def load_image_dataset(spec: str, *, classnames: Sequence[str] | None = None, split: str = "test",
                       revision: str | None = None, **hf_options: Any) -> ImageDataset:
    """A local image folder (``root/<class>/<image>``, optionally under ``root/<split>/``), or one split of an
    HF dataset repo by id or directory (parquet, webdataset, an image folder, or what ``datasets`` reads);
    a hub repo's other splits and configs are neither fetched nor opened."""
    path = Path(spec).expanduser()
    if path.exists() and _is_image_folder(path / split):
        return load_image_folder(path / split, classnames, name=path.name)
    if path.exists() and _is_image_folder(path):
        return load_image_folder(path, classnames, name=path.name)
    return load_hf_image_dataset(spec, split=split, revision=revision, classnames=classnames, **hf_options)


def _is_image_folder(path: Path) -> bool:
    """A directory whose sub-folders hold image files directly (``root/<class>/<image>``)."""
    if not path.is_dir():
        return False
    return any(f.suffix.lower() in IMAGE_SUFFIXES for d in path.iterdir() if d.is_dir() for f in d.iterdir())


def check_label_space(dataset: ImageDataset, num_classes: int, *, task: str) -> None:
    """The head must have exactly the dataset's number of classes (same order is the task file's job)."""
    if len(dataset.classes) != num_classes:
        raise OptionError(f"task '{task}': the dataset has {len(dataset.classes)} classes but the head has {num_classes}")
