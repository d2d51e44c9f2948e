"""One split of one config of a dataset repo, as the real hub repos are laid out (tests/hub_fixtures.py): only its
files are fetched (the allow_patterns given to the hub) and only they are opened (every other split's and
config's shard is garbage that fails any reader), labels and class names come from the ClassLabel feature,
and bad input is one line naming the repo, the split and the row."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
from hub_fixtures import cache_repo, dataset_repo, parquet_repo, webdataset_repo

from massmerge.data.datafiles import card_configs, in_split, infer_files, read_card
from massmerge.data.images import Preprocess, load_image_dataset
from massmerge.errors import MassMergeError

CLASSES = ["zero", "one", "two", "three"]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An offline HF cache; ``add(id, writer)`` lays out a repo; ``patterns`` records every allow_patterns."""
    import huggingface_hub
    from huggingface_hub import constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))  # read at import time
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    patterns: list[list[str] | None] = []
    real = huggingface_hub.snapshot_download

    def recording(*args, **kwargs):
        patterns.append(kwargs.get("allow_patterns"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)

    class Hub:
        def __init__(self) -> None:
            self.patterns = patterns

        def add(self, repo: str, info_of) -> dict:
            files = tmp_path / "files" / repo
            info = info_of(files)
            cache_repo(home, repo, files, "dataset")
            return info

    return Hub()


def _fetched(patterns: list[list[str] | None], names: list[str]) -> list[str]:
    assert all(p is not None for p in patterns), patterns  # never a whole-repo snapshot
    return [n for n in names if any(fnmatch.fnmatch(n, p) for ps in patterns for p in ps)]


def test_svhn_layout_fetches_and_opens_only_the_named_config_and_split(hub) -> None:
    info = hub.add("ufldl-stanford/svhn", lambda root: dataset_repo(root, "ufldl-stanford/svhn", CLASSES, count=4))
    data = load_image_dataset("ufldl-stanford/svhn", split="test", subset="cropped_digits")
    assert data.classes == CLASSES
    assert data.labels().tolist() == info["labels"]
    pixels = list(data.pixels(Preprocess(16, 16)))  # every row decodes: non-square, grayscale and RGB
    assert len(pixels) == 4 and all(p.shape == (3, 16, 16) for p in pixels)
    assert len(info["poisoned"]) == 5  # train and extra of cropped_digits, all three of full_numbers
    assert _fetched(hub.patterns, info["poisoned"]) == []
    assert _fetched(hub.patterns, ["cropped_digits/test-00000-of-00001.parquet"])


@pytest.mark.parametrize("dataset, split", [("ylecun/mnist", "test"), ("ethz/food101", "validation"),
                                            ("1aurent/PatchCamelyon", "test"), ("tanganke/sun397", "test"),
                                            ("nateraw/rendered-sst2", "test")])
def test_default_configs_and_repos_without_a_card(hub, dataset: str, split: str) -> None:
    info = hub.add(dataset, lambda root: dataset_repo(root, dataset, CLASSES, seed=1))
    data = load_image_dataset(dataset, split=split)
    assert data.labels().tolist() == info["labels"] and data.classes == CLASSES
    assert len(list(data.pixels(Preprocess(8, 8)))) == 3
    assert _fetched(hub.patterns, info["poisoned"]) == []


def test_fer2013_webdataset(hub) -> None:
    info = hub.add("clip-benchmark/wds_fer2013", lambda root: webdataset_repo(root, CLASSES, count=5, seed=2))
    data = load_image_dataset("clip-benchmark/wds_fer2013", split="test", image_column="jpg", label_column="cls")
    assert data.classes == CLASSES and data.labels().tolist() == info["labels"]
    assert len(list(data.pixels(Preprocess(8, 8)))) == 5
    assert _fetched(hub.patterns, ["train/0.tar"]) == []


def test_missing_config_split_and_column_are_one_line(hub) -> None:
    hub.add("ufldl-stanford/svhn", lambda root: dataset_repo(root, "ufldl-stanford/svhn", CLASSES))
    hub.add("ylecun/mnist", lambda root: dataset_repo(root, "ylecun/mnist", CLASSES))
    hub.add("org/nocard", lambda root: parquet_repo(root, CLASSES, with_card=False))
    cases = [
        ({"spec": "ufldl-stanford/svhn"}, "has configs cropped_digits, full_numbers; set `subset:`"),
        ({"spec": "ufldl-stanford/svhn", "subset": "digits"}, "no config 'digits' (it has cropped_digits, full_numbers)"),
        ({"spec": "ylecun/mnist", "split": "extra"}, "config 'mnist' has no split 'extra' (it has train, test)"),
        ({"spec": "org/nocard", "split": "validation"}, "no split 'validation' (it has test, train)"),
        ({"spec": "ylecun/mnist", "label_column": "fine"}, "dataset 'ylecun/mnist' split 'test': no column 'fine'"),
    ]
    for options, message in cases:
        with pytest.raises(MassMergeError) as error:
            load_image_dataset(**options)
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_an_image_that_does_not_decode_names_the_repo_split_and_row(tmp_path: Path) -> None:
    from datasets import ClassLabel, Dataset, Features, Image
    from hub_fixtures import tiny_images

    rows = tiny_images(3, 0)
    good = Dataset.from_dict({"image": rows, "label": [0, 1, 2]},
                             features=Features({"image": Image(), "label": ClassLabel(names=CLASSES)}))
    table = good.with_format("arrow")[:]
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = table.column("image").to_pylist()
    column[2] = {"bytes": b"\x89PNG broken", "path": None}
    broken = table.set_column(0, "image", pa.array(column, type=table.schema.field("image").type))
    (tmp_path / "data").mkdir()
    pq.write_table(broken, tmp_path / "data" / "test-00000-of-00001.parquet")
    data = load_image_dataset(str(tmp_path), split="test")
    with pytest.raises(MassMergeError, match=r"split 'test' row 2: the image does not decode"):
        list(data.pixels(Preprocess(8, 8)))


def test_card_forms_and_the_naming_rule(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: a\n  data_files: a/*.parquet\n"
                                        "- config_name: b\n  data_files:\n    test: b/test-*\n    train: [b/tr-*]\n"
                                        "---\n# card\n")
    assert card_configs(read_card(tmp_path / "README.md")) == {"a": {"train": ["a/*.parquet"]},
                                                             "b": {"test": ["b/test-*"], "train": ["b/tr-*"]}}
    assert in_split("data/test-00000-of-00002.parquet", "test") and in_split("test/0.tar", "test")
    assert in_split("data/valid-0.parquet", "validation") and not in_split("data/contest-0.parquet", "test")
    names = ["full/test/0.parquet", "digits/test/0.parquet", "digits/train/0.parquet", "digits/extra/0.parquet"]
    assert infer_files(names, "test", "digits") == ["digits/test/0.parquet"]


def test_a_config_with_data_dir_uses_the_naming_rules_inside_it(tmp_path: Path) -> None:
    from hub_fixtures import poison, write_parquet

    labels = write_parquet(tmp_path / "digits" / "test-00000-of-00001.parquet", CLASSES, 3, seed=5)
    poison(tmp_path / "digits" / "train-00000-of-00001.parquet")
    poison(tmp_path / "letters" / "test-00000-of-00001.parquet")
    (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: digits\n  data_dir: digits\n"
                                        "- config_name: letters\n  data_dir: letters\n---\n")
    data = load_image_dataset(str(tmp_path), split="test", subset="digits")
    assert data.labels().tolist() == labels and data.classes == CLASSES
    with pytest.raises(MassMergeError, match="no split 'extra' \\(it has test, train\\)"):
        load_image_dataset(str(tmp_path), split="extra", subset="digits")
