"""Which files of a dataset repo hold one split of one config, and reading them without an Arrow copy.

Why (issue 27): a benchmark needs the test split of each dataset, but SVHN's repo also holds its ``extra`` split
and a second config, PCAM a 6 GB training split. HF dataset repos declare their files per config and split in
the README's YAML ``configs:`` block (``data_files: [{split: test, path: cropped_digits/test-*}]``); repos
without one follow the ``datasets`` naming rules (a ``test`` folder, or ``test-00000-of-00001.parquet``). We
resolve the split's files from that, fetch only those (``allow_patterns``), open only those, and read parquet
shards a row group at a time and webdataset ``.tar`` shards by member offset: no ``datasets`` Arrow cache.
"""

from __future__ import annotations

import fnmatch
import io
import json
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from massmerge.errors import MassMergeError, OptionError
from massmerge.sources import list_dataset_files, parse_hub_id, resolve_source

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DATA_SUFFIXES = (".parquet", ".tar", ".arrow", ".csv", ".json", ".jsonl", *IMAGE_SUFFIXES)
SIDE_FILES = ("README.md", "classnames.txt")  # the dataset card; a webdataset's class names (clip-benchmark)
# the ``datasets`` library's split keywords: a file belongs to a split when a folder or its name's first word is one
SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing", "eval", "evaluation")}
_WORD = re.compile(r"[-._ 0-9]")


@dataclass(frozen=True)
class SplitFiles:
    """One split's data files, local, with the dataset card they were chosen by."""

    spec: str
    split: str
    config: str | None
    files: list[Path]
    root: Path
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"dataset '{self.spec}' split '{self.split}'"


# ----- the dataset card -----------------------------------------------------------------------------------------

def read_card(path: Path) -> dict[str, Any]:
    """The YAML front matter of a README.md (``---`` ... ``---``), or {} when there is none or it is not YAML."""
    import yaml

    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return {}
    try:
        card = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return card if isinstance(card, dict) else {}


def card_configs(card: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """``{config: {split: [path patterns]}}`` from a card's ``configs:`` block (every form the hub accepts:
    a list of ``{split, path}``, a ``{split: path}`` mapping, or bare paths for ``train``)."""
    out: dict[str, dict[str, list[str]]] = {}
    for entry in card.get("configs") or []:
        if not isinstance(entry, dict) or "config_name" not in entry:
            continue
        files = entry.get("data_files")
        splits: dict[str, list[str]] = {}
        if isinstance(files, (str, list)) and not (isinstance(files, list) and files and isinstance(files[0], dict)):
            splits["train"] = _as_list(files)
        elif isinstance(files, dict):
            splits = {str(k): _as_list(v) for k, v in files.items()}
        elif isinstance(files, list):
            splits = {str(f.get("split", "train")): _as_list(f.get("path")) for f in files if isinstance(f, dict)}
        out[str(entry["config_name"])] = splits
    return out


def _as_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else ([str(value)] if value else [])


def default_config(card: dict[str, Any], spec: str) -> str:
    """The config a dataset loads without a name: the one marked ``default: true``, else ``default``, else the
    only one; several others: the user must name one."""
    entries = [e for e in card.get("configs") or [] if isinstance(e, dict) and "config_name" in e]
    marked = [str(e["config_name"]) for e in entries if e.get("default")]
    names = [str(e["config_name"]) for e in entries]
    if marked:
        return marked[0]
    if "default" in names or len(names) == 1:
        return "default" if "default" in names else names[0]
    raise OptionError(f"dataset '{spec}': has configs {', '.join(names)}; set `subset:` to one of them")


def card_classes(card: dict[str, Any], config: str | None, column: str) -> list[str] | None:
    """Class names of ``column`` from the card's ``dataset_info`` (``class_label: {names: {'0': a, ...}}``)."""
    infos = card.get("dataset_info")
    infos = infos if isinstance(infos, list) else [infos] if isinstance(infos, dict) else []
    for info in infos:
        if len(infos) > 1 and info.get("config_name") not in (config, None):
            continue
        for feature in info.get("features") or []:
            if isinstance(feature, dict) and feature.get("name") == column:
                names = ((feature.get("dtype") or {}).get("class_label") or {}).get("names") \
                    if isinstance(feature.get("dtype"), dict) else None
                if isinstance(names, dict):
                    return [str(names[k]) for k in sorted(names, key=lambda k: int(k))]
                if isinstance(names, list):
                    return [str(n) for n in names]
    return None


# ----- which files --------------------------------------------------------------------------------------------

def in_split(path: str, split: str) -> bool:
    """The ``datasets`` naming rule: a folder named after the split, or a file name whose first word is it."""
    words = SPLIT_WORDS.get(split, (split,))
    parts = PurePosixPath(path).parts
    first = _WORD.split(parts[-1], maxsplit=1)[0].lower()
    return any(p.lower() in words for p in parts[:-1]) or first in words


def infer_files(names: Sequence[str], split: str, config: str | None) -> list[str]:
    """The data files of ``split`` (and of the top folder ``config`` when the repo has one) among ``names``."""
    data = [n for n in names if n.lower().endswith(DATA_SUFFIXES) and not n.startswith(".")]
    if config is not None and any(n.split("/", 1)[0] == config for n in data):
        data = [n for n in data if n.split("/", 1)[0] == config]
    return sorted(n for n in data if in_split(n, split))


def split_names(names: Sequence[str]) -> list[str]:
    """The splits the naming rule finds among ``names`` (for an error that lists what a repo has)."""
    known = {word: split for split, words in SPLIT_WORDS.items() for word in words}
    found = set()
    for name in names:
        if not name.lower().endswith(DATA_SUFFIXES):
            continue
        parts = PurePosixPath(name).parts
        for word in [p.lower() for p in parts[:-1]] + [_WORD.split(parts[-1], maxsplit=1)[0].lower()]:
            if word in known or word == "extra":
                found.add(known.get(word, word))
    return sorted(found)


def resolve_split(spec: str, *, split: str, config: str | None = None, revision: str | None = None) -> SplitFiles:
    """The local files of one split of one config of a dataset (a hub id or a local folder); a hub repo is
    fetched with ``allow_patterns`` for those files (and the card) only."""
    path = Path(spec).expanduser()
    hub = not path.exists() and parse_hub_id(spec) is not None
    if hub:
        path = resolve_source(spec, revision, allow_patterns=("README.md",), repo_type="dataset")
    card = read_card(path / "README.md")
    configs = card_configs(card)
    listing = (lambda: list_dataset_files(spec, revision)) if hub else (lambda: _listing(path))
    if configs:
        name = config or default_config(card, spec)
        if name not in configs:
            raise OptionError(f"dataset '{spec}': no config '{name}' (it has {', '.join(configs)})")
        folder = card_data_dir(card, name)
        if not configs[name] and folder:  # ``data_dir:`` instead of ``data_files:``: the naming rules inside it
            patterns = _inferred(spec, [n for n in listing() if n.startswith(folder.rstrip("/") + "/")], split, None)
        elif split not in configs[name]:
            raise OptionError(f"dataset '{spec}': config '{name}' has no split '{split}' "
                              f"(it has {', '.join(configs[name])})")
        else:
            patterns = configs[name][split]
        chosen = name
    else:
        patterns, chosen = _inferred(spec, listing(), split, config), config
    if hub:
        path = resolve_source(spec, revision, allow_patterns=(*patterns, *SIDE_FILES), repo_type="dataset")
    files = [path / n for n in _listing(path) if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not files:
        raise MassMergeError(f"dataset '{spec}': split '{split}' names {patterns} but no such file is there")
    return SplitFiles(spec, split, chosen, sorted(files), path, card)


def _inferred(spec: str, names: Sequence[str], split: str, config: str | None) -> list[str]:
    """The files of ``split`` among ``names`` by the naming rules; none is one line listing the splits found."""
    patterns = infer_files(names, split, config)
    if not patterns:
        found = split_names(names)
        raise OptionError(f"dataset '{spec}': no split '{split}'" + (f" in '{config}'" if config else "")
                          + f" (it has {', '.join(found) if found else 'no data files'})")
    return patterns


def card_data_dir(card: dict[str, Any], name: str) -> str | None:
    """A config's ``data_dir`` (the folder its files are under, split by the naming rules), if it has one."""
    for entry in card.get("configs") or []:
        if isinstance(entry, dict) and str(entry.get("config_name")) == name and entry.get("data_dir"):
            return str(entry["data_dir"])
    return None


def _listing(root: Path) -> list[str]:
    """Every file under ``root`` as a posix path relative to it (what a repo's file list holds)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


# ----- reading them -------------------------------------------------------------------------------------------

class ParquetImages:
    """Images of parquet shards by global row: the row group of a row is read (that column only) when first
    needed and kept until another is, so an in-order pass reads each row group once."""

    def __init__(self, files: Sequence[Path], column: str, where: str) -> None:
        self.files, self.column, self.where = list(files), column, where
        self.groups: list[tuple[int, int, int]] = []  # (first row, file index, row group)
        row = 0
        for index, file in enumerate(self.files):
            meta = _parquet(file).metadata
            for group in range(meta.num_row_groups):
                self.groups.append((row, index, group))
                row += meta.row_group(group).num_rows
        self.starts = [g[0] for g in self.groups]
        self._cached: tuple[int, list[Any]] | None = None

    def __getstate__(self) -> dict[str, Any]:  # a worker process starts with no row group cached
        return {**self.__dict__, "_cached": None}

    def raw(self, row: int) -> Any:
        import bisect

        slot = bisect.bisect_right(self.starts, row) - 1
        if self._cached is None or self._cached[0] != slot:
            _, index, group = self.groups[slot]
            table = _parquet(self.files[index]).read_row_group(group, columns=[self.column])
            self._cached = (slot, table.column(0).to_pylist())
        return self._cached[1][row - self.groups[slot][0]]

    def __call__(self, row: int) -> Any:
        value = self.raw(row)
        data = value.get("bytes") if isinstance(value, dict) else value
        return decode_image(data, f"{self.where} row {row}")


class TarImages:
    """Images of webdataset shards by sample: each member is read at its offset (the shard is not unpacked)."""

    def __init__(self, entries: Sequence[tuple[Path, int, int]], where: str) -> None:
        self.entries, self.where = list(entries), where

    def __call__(self, row: int) -> Any:
        file, offset, size = self.entries[row]
        with open(file, "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        return decode_image(data, f"{self.where} row {row}")


def decode_image(data: Any, where: str) -> Any:
    """A PIL image from encoded bytes; anything else is one line naming the repo, split and row."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray)):
        raise MassMergeError(f"{where}: no image bytes in this row")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.copy()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad file
        raise MassMergeError(f"{where}: the image does not decode ({type(exc).__name__})") from None


def _parquet(file: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MassMergeError(f"{file}: reading parquet datasets needs pyarrow: `pip install massmerge[hub]`") from None
    try:
        return pq.ParquetFile(file)
    except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError
        raise MassMergeError(f"{file}: not a readable parquet file ({str(exc).splitlines()[0][:120]})") from None


@dataclass
class Table:
    """One split read for evaluation: class names, (row, label) items and the image loader."""

    classes: list[str]
    labels: list[int]
    loader: Any


def read_parquet(found: SplitFiles, image_column: str | None, label_column: str | None) -> Table:
    """Labels (that column alone) and a row-group image loader of parquet shards; class names from the
    files' ``huggingface`` schema metadata (ClassLabel), else the card, else the sorted label values."""
    first = _parquet(found.files[0])
    columns = first.schema_arrow.names
    image = image_column or _pick(columns, ("image", "img", "jpg", "png", "webp"), found, "image")
    label = label_column or _pick(columns, ("label", "labels", "fine_label", "cls"), found, "label")
    for name in (image, label):
        if name not in columns:
            raise OptionError(f"{found.where}: no column '{name}' (has {', '.join(columns)})")
    labels = [int(v) for f in found.files for v in _parquet(f).read(columns=[label]).column(0).to_pylist()]
    classes = _schema_classes(first, label) or card_classes(found.card, found.config, label)
    return Table(classes or [str(v) for v in sorted(set(labels))], labels, ParquetImages(found.files, image, found.where))


def _schema_classes(file: Any, column: str) -> list[str] | None:
    meta = file.schema_arrow.metadata or {}
    try:
        features = json.loads(meta[b"huggingface"])["info"]["features"]
    except (KeyError, ValueError, TypeError):
        return None
    names = (features.get(column) or {}).get("names")
    return [str(n) for n in names] if isinstance(names, list) else None


def read_webdataset(found: SplitFiles, image_column: str | None, label_column: str | None) -> Table:
    """A webdataset split (``.tar`` shards of ``KEY.jpg`` / ``KEY.cls`` members, as clip-benchmark writes them):
    members indexed by offset, labels read from the ``cls`` members, class names from ``classnames.txt``."""
    image_ext, label_ext = image_column, label_column or "cls"
    samples: dict[tuple[int, str], dict[str, tuple[Path, int, int]]] = {}
    for index, file in enumerate(found.files):
        try:
            with tarfile.open(file) as tar:
                for member in tar:
                    if member.isfile():
                        folder, _, base = member.name.rpartition("/")
                        key, _, ext = base.partition(".")  # webdataset: the key ends at the name's first dot
                        samples.setdefault((index, f"{folder}/{key}"), {})[ext] = \
                            (file, member.offset_data, member.size)
        except tarfile.TarError as exc:
            raise MassMergeError(f"{file}: not a readable tar shard ({exc})") from None
    entries, labels = [], []
    for row, parts in enumerate(samples.values()):  # shard order, then member order
        ext = image_ext or next((e for e in parts if "." + e in IMAGE_SUFFIXES), None)
        if ext not in parts or label_ext not in parts:
            raise OptionError(f"{found.where} row {row}: no '{ext or 'image'}' or '{label_ext}' member "
                              f"(has {', '.join(sorted(parts))}); set image_column/label_column")
        entries.append(parts[ext])
        file, offset, size = parts[label_ext]
        with open(file, "rb") as handle:
            handle.seek(offset)
            text = handle.read(size).decode("utf-8", "replace").strip()
        if not text.lstrip("-").isdigit():
            raise MassMergeError(f"{found.where} row {row}: label '{text[:20]}' is not an integer")
        labels.append(int(text))
    names_file = found.root / "classnames.txt"
    classes = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if names_file.is_file() else [str(v) for v in sorted(set(labels))]
    return Table(classes, labels, TarImages(entries, found.where))


def _pick(columns: Sequence[str], names: Sequence[str], found: SplitFiles, what: str) -> str:
    for name in names:
        if name in columns:
            return name
    raise OptionError(f"{found.where}: no {what} column among {list(names)} (has {', '.join(columns)}); "
                      f"set {what}_column")


__all__ = ["DATA_SUFFIXES", "IMAGE_SUFFIXES", "ParquetImages", "SplitFiles", "Table", "TarImages", "card_classes",
           "card_data_dir",
           "card_configs", "decode_image", "default_config", "in_split", "infer_files", "read_card", "read_parquet",
           "read_webdataset", "resolve_split"]
