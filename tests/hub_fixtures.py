"""A local HF hub cache made by the tests: what `hf download` would leave, so hub ids resolve offline.

Layout (huggingface_hub's): ``HF_HOME/hub/{models|datasets}--ORG--NAME/refs/main`` holds a commit id and
``snapshots/<commit>/`` the repo's files. With ``HF_HUB_OFFLINE=1`` ``snapshot_download`` returns that folder.

Dataset repos in miniature, as the real ones are laid out (checked against the repos the example configs name):
- parquet shards per config and split, ``<folder>/<split>-00000-of-00001.parquet``, written by ``datasets``
  (``Image`` and ``ClassLabel`` features, so the schema carries the class names), with a README ``configs:``
  block (ufldl-stanford/svhn: configs cropped_digits and full_numbers, splits train/test/extra, no default;
  ylecun/mnist, zalando-datasets/fashion_mnist, ethz/food101: one named config marked default; tanganke/*:
  ``data/``), or without a card (the ``datasets`` naming rules);
- the webdataset of clip-benchmark/wds_fer2013: ``classnames.txt``, ``<split>/0.tar`` of ``sNNNNNNN.jpg`` and
  ``sNNNNNNN.cls`` members and ``<split>/nshards.txt`` (CLIP_benchmark's webdataset_builder.py).
Files a run must not open (other splits, other configs) are written as garbage with :func:`poison`: opening one
fails the run.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path

import torch

GARBAGE = b"not a data file: a run that opens this file fails\n"


def cache_repo(hf_home: Path, repo_id: str, files: Path, repo_type: str = "model") -> Path:
    """Copy the directory ``files`` into the cache as ``repo_id``'s main revision; returns the snapshot folder."""
    kind = {"model": "models", "dataset": "datasets"}[repo_type]
    root = hf_home / "hub" / f"{kind}--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    shutil.copytree(files, snapshot, dirs_exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


def tiny_images(count: int, seed: int) -> list:
    """``count`` small PIL images: RGB non-square, grayscale ('L') and square in turn."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        h, w = [(12, 20), (16, 16), (21, 13)][i % 3]
        pixels = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
        image = Image.fromarray(pixels)
        out.append(image.convert("L") if i % 3 == 1 else image)
    return out


def write_parquet(path: Path, classes: Sequence[str], count: int, seed: int, *, label: str = "label") -> list[int]:
    """One parquet shard (``datasets``' writer: Image and ClassLabel features); returns its labels."""
    from datasets import ClassLabel, Dataset, Features, Image

    labels = [(seed + i) % len(classes) for i in range(count)]
    features = Features({"image": Image(), label: ClassLabel(names=list(classes))})
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict({"image": tiny_images(count, seed), label: labels}, features=features).to_parquet(str(path))
    return labels


def card(configs: dict[str, dict[str, str]], classes: Sequence[str], *, default: str | None = None,
         label: str = "label") -> str:
    """A README.md whose YAML front matter declares ``configs:`` (split -> path glob) and ClassLabel features."""
    lines = ["---", "dataset_info:"]
    for name in configs:
        lines += [f"- config_name: {name}", "  features:", "  - name: image", "    dtype: image",
                  f"  - name: {label}", "    dtype:", "      class_label:", "        names:"]
        lines += [f"          '{i}': {c!r}" for i, c in enumerate(classes)]
    lines.append("configs:")
    for name, splits in configs.items():
        lines.append(f"- config_name: {name}")
        if name == default:
            lines.append("  default: true")
        lines.append("  data_files:")
        lines += [f"  - split: {split}\n    path: {glob}" for split, glob in splits.items()]
    return "\n".join([*lines, "---", "", "# a tiny replica", ""])


def parquet_repo(root: Path, classes: Sequence[str], *, folders: Sequence[str] = ("data",), wanted: str = "data",
                 splits: Sequence[str] = ("train", "test"), split: str = "test", with_card: bool = True,
                 default: str | None = None, count: int = 3, seed: int = 0) -> dict[str, list[int]]:
    """A parquet dataset repo: ``<folder>/<split>-00000-of-00001.parquet`` for every folder (config) and split.
    Only ``wanted``/``split`` holds real data; every other shard is garbage (:func:`poison`). Returns the labels
    of the wanted split under ``"labels"`` and the garbage files under ``"poisoned"``."""
    root.mkdir(parents=True, exist_ok=True)
    labels: list[int] = []
    poisoned = []
    for folder in folders:
        for name in splits:
            path = root / folder / f"{name}-00000-of-00001.parquet"
            if folder == wanted and name == split:
                labels = write_parquet(path, classes, count, seed)
            else:
                poisoned.append(poison(path))
    if with_card:
        configs = {folder if folder != "data" else "default": {s: f"{folder}/{s}-*" for s in splits}
                   for folder in folders}
        (root / "README.md").write_text(card(configs, classes, default=default))
    return {"labels": labels, "poisoned": [str(p.relative_to(root)) for p in poisoned]}


def webdataset_repo(root: Path, classes: Sequence[str], *, splits: Sequence[str] = ("train", "test"),
                    split: str = "test", count: int = 3, seed: int = 0) -> dict[str, list]:
    """clip-benchmark's webdataset layout: ``classnames.txt``, templates, ``<split>/0.tar`` (``s0000000.jpg`` and
    ``s0000000.cls``) and ``<split>/nshards.txt``; the other splits' shards are garbage."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    labels, poisoned = [], []
    for name in splits:
        (root / name).mkdir(exist_ok=True)
        (root / name / "nshards.txt").write_text("1\n")
        if name != split:
            poisoned.append(poison(root / name / "0.tar"))
            continue
        with tarfile.open(root / name / "0.tar", "w") as tar:
            for i, image in enumerate(tiny_images(count, seed)):
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="JPEG")
                labels.append((seed + i) % len(classes))
                for ext, data in (("jpg", buffer.getvalue()), ("cls", str(labels[-1]).encode())):
                    info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {"labels": labels, "poisoned": [str(p.relative_to(root)) for p in poisoned]}


def poison(path: Path) -> Path:
    """A data file that must not be opened: garbage under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(GARBAGE)
    return path


# How each dataset id of the example configs is laid out on the hub (folder of its shards, its configs, splits).
LAYOUTS: dict[str, dict] = {
    "ufldl-stanford/svhn": {"folders": ("cropped_digits", "full_numbers"), "wanted": "cropped_digits",
                            "splits": ("train", "test", "extra")},
    "ylecun/mnist": {"folders": ("mnist",), "wanted": "mnist", "default": "mnist"},
    "zalando-datasets/fashion_mnist": {"folders": ("fashion_mnist",), "wanted": "fashion_mnist",
                                       "default": "fashion_mnist"},
    "ethz/food101": {"folders": ("plain_text",), "wanted": "plain_text", "default": "plain_text",
                     "splits": ("train", "validation"), "split": "validation"},
    "dpdl-benchmark/oxford_flowers102": {"splits": ("train", "validation", "test")},
    "1aurent/PatchCamelyon": {"splits": ("train", "valid", "test")},
    "nateraw/rendered-sst2": {"splits": ("train", "validation", "test"), "with_card": False},
}


def dataset_repo(root: Path, dataset: str, classes: Sequence[str], seed: int = 0, count: int = 3) -> dict[str, list]:
    """The miniature of ``dataset`` (an example config's id) with ``classes``, laid out as the real repo."""
    if dataset == "clip-benchmark/wds_fer2013":
        return webdataset_repo(root, classes, count=count, seed=seed)
    return parquet_repo(root, classes, count=count, seed=seed, **LAYOUTS.get(dataset, {}))
