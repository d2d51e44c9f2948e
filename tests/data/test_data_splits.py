"""Splits: seeded, disjoint, balanced where the data allows; presets are what the issue asks for."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from massmerge.data.common import LabelledText
from massmerge.data.tasks import PRESETS, TASKS, get_preset, make_splits, round_robin_order
from massmerge.errors import MassMergeError, OptionError


def _data(n_per_class: list[int]) -> LabelledText:
    texts, labels = [], []
    for c, n in enumerate(n_per_class):
        texts += [f"class {c} item {i}" for i in range(n)]
        labels += [c] * n
    return LabelledText(texts, labels, [f"c{c}" for c in range(len(n_per_class))])


def test_splits_are_disjoint_and_sized() -> None:
    task = make_splits("t", _data([300, 50, 120]), n_train=200, n_val=20, n_test=90, seed=0)
    train, val, test = set(task.train.texts), set(task.val.texts), set(task.test.texts)
    assert not (train & test) and not (val & test) and not (train & val)
    assert (len(train), len(val), len(test)) == (200, 20, 90)


def test_test_split_is_balanced_when_classes_allow() -> None:
    task = make_splits("t", _data([300, 50, 120]), n_train=100, n_val=10, n_test=90, seed=0)
    assert Counter(task.test.labels) == {0: 30, 1: 30, 2: 30}


def test_splits_are_seeded() -> None:
    data = _data([40, 40])
    a = make_splits("t", data, 20, 5, 10, seed=1)
    assert a.test.texts == make_splits("t", data, 20, 5, 10, seed=1).test.texts
    assert a.test.texts != make_splits("t", data, 20, 5, 10, seed=2).test.texts


def test_round_robin_prefix_alternates_classes() -> None:
    order = round_robin_order([0, 0, 0, 1, 1, 1], 2, np.random.default_rng(0))
    assert [i // 3 for i in order] == [0, 1, 0, 1, 0, 1]


def test_too_little_data_is_a_clear_error() -> None:
    with pytest.raises(MassMergeError, match="fewer than test"):
        make_splits("tiny", _data([3, 3]), 10, 5, 10, seed=0)


def test_presets_match_the_issue() -> None:
    assert len(PRESETS["ci"].tasks) == 4
    assert len(set(PRESETS["default"].tasks)) >= 8 and PRESETS["default"].n_test >= 500
    assert len(set(PRESETS["wide"].tasks)) >= 12
    assert all(t in TASKS for p in PRESETS.values() for t in p.tasks)


def test_wide_splits_nouns_into_disjoint_groups() -> None:
    a, b = TASKS["wordnet_nouns_a"].class_subset, TASKS["wordnet_nouns_b"].class_subset
    assert a and b and not set(a) & set(b) and len(a) + len(b) == 26


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(OptionError, match="ci, default, wide"):
        get_preset("huge")
