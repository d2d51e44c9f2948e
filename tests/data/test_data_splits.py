"""Splits: seeded, disjoint, balanced where the data allows; presets are what the issue asks for."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from massmerge.data.common import LabelledText, visible_forms
from massmerge.data.tasks import PRESETS, TASKS, TaskSpec, get_preset, load_task, make_splits, round_robin_order
from massmerge.data.tasks import task_texts
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


#: The former ``default`` preset, kept as ``overlap``: these names and sizes are what its cached experts hang on.
FORMER_DEFAULT = ("wordnet_nouns", "wordnet_verbs", "wordnet_pos", "quote_topics_a", "quote_topics_b",
                  "quote_language", "spam", "debian_apps")
SHORT_TASKS = {"word_language", "place_country", "emoji_group", "word_pos"}


def test_presets_are_ci_distinct_overlap_wide() -> None:
    assert list(PRESETS) == ["ci", "distinct", "overlap", "wide"]  # "default" is gone: distinct is the default
    assert all(t in TASKS for p in PRESETS.values() for t in p.tasks)
    assert all(len(set(p.tasks)) == len(p.tasks) for p in PRESETS.values())


def test_ci_and_overlap_keep_their_tasks_and_sizes() -> None:
    ci, overlap = PRESETS["ci"], PRESETS["overlap"]
    assert (ci.tasks, ci.n_train, ci.n_val, ci.n_test) == (
        ("wordnet_pos", "quote_language", "spam", "debian_apps"), 640, 64, 160)
    assert (overlap.tasks, overlap.n_train, overlap.n_val, overlap.n_test) == (FORMER_DEFAULT, 4000, 100, 500)


def test_distinct_takes_one_task_per_source_with_short_inputs_among_them() -> None:
    distinct = PRESETS["distinct"]
    sources = [TASKS[t].source for t in distinct.tasks]
    assert len(distinct.tasks) == 8 and len(set(sources)) == len(sources)
    assert SHORT_TASKS <= set(distinct.tasks)
    assert {"wordnet-base", "fortunes", "spam-assassin", "apt-snapshot"} <= set(sources)
    assert (distinct.n_train, distinct.n_val, distinct.n_test) == (4000, 200, 500)


def test_wide_has_every_task_but_the_one_it_splits() -> None:
    wide = PRESETS["wide"]
    assert set(wide.tasks) == set(TASKS) - {"wordnet_nouns"} and len(wide.tasks) >= 12


def test_split_sizes_cap_val_and_test_only_where_a_task_sets_a_maximum() -> None:
    capped = TaskSpec("t", "", "src", lambda _root: _data([1]), (), max_test=300, max_val=150)
    assert capped.split_sizes(4000, 200, 500) == (4000, 150, 300)
    assert capped.split_sizes(640, 64, 160) == (640, 64, 160)
    assert TaskSpec("u", "", "src", lambda _root: _data([1]), ()).split_sizes(4000, 200, 500) == (4000, 200, 500)


def test_load_task_applies_caps_and_keeps_splits_disjoint_balanced_and_seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TaskSpec("small", "a small task", "src", lambda _root: _data([60, 25, 40]), ("{}",),
                    max_test=30, max_val=15)  # fmt: skip
    monkeypatch.setitem(TASKS, "small", spec)
    task = load_task("small", 4000, 200, 500)
    assert task.sizes == {"test": 30, "val": 15, "train": 125 - 45}
    assert Counter(task.test.labels) == {0: 10, 1: 10, 2: 10} and Counter(task.val.labels) == {0: 5, 1: 5, 2: 5}
    train, val, test = set(task.train.texts), set(task.val.texts), set(task.test.texts)
    assert not (train & val or train & test or val & test)
    assert task.test.texts == load_task("small", 4000, 200, 500).test.texts
    assert task.test.texts != load_task("small", 4000, 200, 500, seed=1).test.texts


def test_disjoint_from_drops_inputs_another_task_has_as_the_model_sees_them(monkeypatch: pytest.MonkeyPatch) -> None:
    words = LabelledText(["banana", "Paris", "shaggy", "loudly", "Café"], [0, 1, 2, 3, 0], ["a", "b", "c", "d"])
    names = LabelledText(["BANANA", "paris", "cafe"], [0, 0, 0], ["x"])
    monkeypatch.setitem(TASKS, "names", TaskSpec("names", "", "s1", lambda _root: names, ()))
    monkeypatch.setitem(TASKS, "words", TaskSpec("words", "", "s2", lambda _root: words, (), disjoint_from=("names",)))
    kept = task_texts("words")
    assert kept.texts == ["shaggy", "loudly"] and kept.labels == [2, 3] and kept.classes == words.classes


def test_short_tasks_that_could_share_inputs_are_declared_disjoint() -> None:
    assert set(TASKS["word_pos"].disjoint_from) == {"emoji_group", "place_country"}
    assert TASKS["word_language"].disjoint_from == ("word_pos",)  # WSJ names such as "spago" are foreign words too


def _require_installed(*names: str) -> dict[str, LabelledText]:
    """The tasks' texts, or a skip when their files are missing (checked at run time: loading is not free)."""
    try:
        return {name: task_texts(name) for name in names}
    except MassMergeError as exc:
        pytest.skip(str(exc))


def test_real_short_tasks_under_distinct_sizes() -> None:
    texts = _require_installed("emoji_group", "place_country", "word_pos")
    distinct = PRESETS["distinct"]
    sizes = (distinct.n_train, distinct.n_val, distinct.n_test)
    tasks = {name: load_task(name, *sizes) for name in ("emoji_group", "place_country", "word_pos")}
    for name, task in tasks.items():
        spec = TASKS[name]
        assert task.sizes["test"] == min(distinct.n_test, spec.max_test or distinct.n_test)
        assert task.sizes["val"] == min(distinct.n_val, spec.max_val or distinct.n_val)
        assert task.sizes["train"] >= 2 * task.sizes["test"]  # the caps leave most of a small task to train on
        splits = [set(task.train.texts), set(task.val.texts), set(task.test.texts)]
        assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
        counts = Counter(task.test.labels)
        assert max(counts.values()) - min(counts.values()) <= 1  # the test split is balanced
    words = {visible_forms(t) for split in ("train", "val", "test") for t in getattr(tasks["word_pos"], split).texts}
    assert not words & {visible_forms(t) for name in ("emoji_group", "place_country") for t in texts[name].texts}


def test_wide_splits_nouns_into_disjoint_groups() -> None:
    a, b = TASKS["wordnet_nouns_a"].class_subset, TASKS["wordnet_nouns_b"].class_subset
    assert a and b and not set(a) & set(b) and len(a) + len(b) == 26


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(OptionError, match="ci, distinct, overlap, wide"):
        get_preset("huge")


@pytest.mark.slow
def test_no_input_of_the_distinct_preset_belongs_to_two_tasks() -> None:
    """With the task hidden, a shared input would have two right tasks (about 10 s: it reads every word list)."""
    seen: dict[str, str] = {}
    for name, data in _require_installed(*PRESETS["distinct"].tasks).items():
        for form in {visible_forms(t) for t in data.texts}:
            assert seen.setdefault(form, name) == name, f"{form!r} is an input of {seen[form]} and {name}"
