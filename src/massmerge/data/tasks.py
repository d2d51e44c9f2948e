"""The offline suite's task registry, presets and seeded splits.

A task is a loader of real labelled text plus the prompt templates its zero-shot head is built from. Splits are
made here, once, the same way for every method: deduplicated texts, a seeded per-class shuffle, classes dealt
round-robin so the test set is as balanced as the data allows, then test, val and train cut from that one order,
so the three are disjoint by construction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from massmerge.data import debian, emoji, fortunes, isocodes, poslex, spam, wordlists, wordnet
from massmerge.data.common import LabelledText, visible_forms
from massmerge.errors import MassMergeError, OptionError

Loader = Callable[[Path | None], LabelledText]

_QUOTE = ("a quote about {}.", "a fortune cookie about {}.", "a saying on the topic of {}.")
_WORD = ("a definition of a {}.", "the meaning of a word for a {}.", "a dictionary entry about a {}.")
_VERB = ("a verb of {}.", "a definition of a verb about {}.", "a dictionary entry for an action of {}.")
_POS = ("a dictionary definition of a {}.", "the gloss of a {}.", "a {} defined in a dictionary.")
_LANG = ("a quote in {}.", "a sentence written in {}.", "a saying in the {} language.")
_MAIL = ("an email that is {}.", "this message is {}.", "an email: {}.")
_PKG = ("a software package for {}.", "a Debian package in the {} section.", "a program for {}.")
_LANG_PKG = ("a software library for {}.", "a Debian package for the {} programming language.",
             "a {} module.")  # fmt: skip
_USE = ("a program for {}.", "software used for {}.", "a tool for {}.")
_WORD_LANG = ("a word in {}.", "a {} word.", "this word is written in {}.")
_PLACE = ("a place in {}.", "a region of {}.", "a province or district of {}.")
_EMOJI = ("an emoji of {}.", "an emoji in the group {}.", "a picture symbol for {}.")
_WORD_POS = ("a word that is a {}.", "the part of speech {}.", "an English {}.")


@dataclass(frozen=True)
class TaskSpec:
    """A named task: where its data comes from and how its zero-shot head is prompted.

    ``source`` names the package family the texts come from; the ``distinct`` preset takes one task per source.
    ``max_test`` and ``max_val`` cap the splits of a small task below what a preset asks, so enough is left to
    train on; the splits stay seeded, disjoint and balanced as :func:`make_splits` cuts them. ``disjoint_from``
    names tasks whose inputs this task drops (compared as the uncased model sees them): with the task hidden, an
    input that two tasks share has two right tasks, so a preset of distinct domains must not contain one.
    """

    name: str
    description: str
    source: str
    load: Loader
    templates: tuple[str, ...]
    class_subset: tuple[int, ...] | None = None  # keep only these classes (to split a large label set)
    max_test: int | None = None
    max_val: int | None = None
    disjoint_from: tuple[str, ...] = ()

    def split_sizes(self, n_train: int, n_val: int, n_test: int) -> tuple[int, int, int]:
        """The (train, val, test) sizes this task uses when a preset asks for the given ones."""
        return n_train, min(n_val, self.max_val or n_val), min(n_test, self.max_test or n_test)


@dataclass(frozen=True)
class Split:
    """Texts and labels of one split; labels index the task's classes."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TaskData:
    """One task ready for the suite: classes in dataset order, templates and disjoint train/val/test splits."""

    name: str
    classes: list[str]
    templates: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    description: str = ""
    sizes: dict[str, int] = field(default_factory=dict)


def _wordnet(fn: Callable[[Path], LabelledText]) -> Loader:
    return lambda _root: fn(wordnet.WORDNET_DIR)


def _fortune(fn: Callable[[Path], LabelledText]) -> Loader:
    return lambda _root: fn(fortunes.FORTUNE_DIR)


def _fixed(fn: Callable[[], LabelledText]) -> Loader:
    """A loader of files at fixed system paths (the data directory does not apply)."""
    return lambda _root: fn()


_NOUN_A = tuple(range(0, 13))
_NOUN_B = tuple(range(13, 26))
_WN, _FORTUNES, _SPAM, _APT = "wordnet-base", "fortunes", "spam-assassin", "apt-snapshot"

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec("wordnet_nouns", "WordNet noun gloss -> 26 supersenses", _WN, _wordnet(wordnet.noun_supersenses),
                 _WORD),
        TaskSpec("wordnet_nouns_a", "WordNet noun gloss -> supersenses 1-13", _WN,
                 _wordnet(wordnet.noun_supersenses), _WORD, _NOUN_A),
        TaskSpec("wordnet_nouns_b", "WordNet noun gloss -> supersenses 14-26", _WN,
                 _wordnet(wordnet.noun_supersenses), _WORD, _NOUN_B),
        TaskSpec("wordnet_verbs", "WordNet verb gloss -> 15 supersenses", _WN, _wordnet(wordnet.verb_supersenses),
                 _VERB),
        TaskSpec("wordnet_pos", "WordNet gloss -> part of speech", _WN, _wordnet(wordnet.gloss_pos), _POS),
        TaskSpec("quote_topics_a", "English fortune -> 8 topics", _FORTUNES, _fortune(fortunes.topics_a), _QUOTE),
        TaskSpec("quote_topics_b", "English fortune -> 8 other topics", _FORTUNES, _fortune(fortunes.topics_b),
                 _QUOTE),
        TaskSpec("quote_topics_es", "Spanish fortune -> 8 topics", _FORTUNES, _fortune(fortunes.topics_es), _QUOTE),
        TaskSpec("quote_language", "fortune -> 8 languages", _FORTUNES, _fortune(fortunes.language), _LANG),
        TaskSpec("spam", "SpamAssassin email -> spam or ham", _SPAM, spam.spam, _MAIL),
        TaskSpec("debian_apps", "Debian package description -> 10 sections", _APT, debian.sections_apps, _PKG),
        TaskSpec("debian_langs", "Debian package description -> 10 language sections", _APT,
                 debian.sections_langs, _LANG_PKG),
        TaskSpec("debian_uses", "Debian package description -> debtags use::", _APT, debian.uses, _USE),
        TaskSpec("word_language", "one word -> 8 languages (word lists)", "wordlists",
                 _fixed(wordlists.word_language), _WORD_LANG, disjoint_from=("word_pos",)),
        TaskSpec("place_country", "ISO 3166-2 subdivision name -> 10 countries", "iso-codes",
                 _fixed(isocodes.place_country), _PLACE, max_test=300, max_val=150),
        TaskSpec("emoji_group", "emoji name -> 8 emoji groups", "unicode-data", _fixed(emoji.emoji_group), _EMOJI,
                 max_test=320, max_val=160),
        TaskSpec("word_pos", "one English word -> 5 parts of speech (Penn Treebank)", "festlex-poslex",
                 _fixed(poslex.word_pos), _WORD_POS, disjoint_from=("emoji_group", "place_country")),
    ]
}  # fmt: skip


@dataclass(frozen=True)
class Preset:
    """Which tasks and how much data and training a suite run uses."""

    name: str
    tasks: tuple[str, ...]
    n_train: int
    n_val: int
    n_test: int


_OVERLAP = ("wordnet_nouns", "wordnet_verbs", "wordnet_pos", "quote_topics_a", "quote_topics_b", "quote_language",
            "spam", "debian_apps")
_DISTINCT = ("wordnet_nouns", "quote_topics_a", "spam", "debian_apps", "word_language", "place_country",
             "emoji_group", "word_pos")
_WIDE = ("wordnet_nouns_a", "wordnet_nouns_b", "wordnet_verbs", "wordnet_pos", "quote_topics_a", "quote_topics_b",
         "quote_topics_es", "quote_language", "spam", "debian_apps", "debian_langs", "debian_uses", "word_language",
         "place_country", "emoji_group", "word_pos")

#: ``ci``: the whole pipeline in minutes. ``distinct`` (the suite's default): one task per source, clearly different
#: domains, half of them short inputs, as the paper's benchmark of 8 image datasets. ``overlap``: tasks that read the
#: same kinds of text (the hard case; the former ``default``). ``wide``: every task except ``wordnet_nouns``, which
#: it splits into ``wordnet_nouns_a`` and ``_b``. Router settings are chosen on val, so distinct and wide keep 200.
DEFAULT_PRESET = "distinct"  # what `massmerge suite` and SuiteConfig() run
PRESETS: dict[str, Preset] = {
    "ci": Preset("ci", ("wordnet_pos", "quote_language", "spam", "debian_apps"), 640, 64, 160),
    "distinct": Preset("distinct", _DISTINCT, 4000, 200, 500),
    "overlap": Preset("overlap", _OVERLAP, 4000, 100, 500),
    "wide": Preset("wide", _WIDE, 4000, 200, 500),
}  # fmt: skip


def get_preset(name: str) -> Preset:
    """The preset called ``name`` or an OptionError listing the known ones."""
    if name not in PRESETS:
        raise OptionError(f"unknown preset {name!r} for --preset: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def _seed_for(task: str, seed: int) -> int:
    digest = hashlib.sha256(f"{task}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def round_robin_order(labels: list[int], n_classes: int, rng: np.random.Generator) -> list[int]:
    """Indices shuffled within each class, then dealt one class at a time, so every prefix is near-balanced."""
    per_class = [rng.permutation(np.flatnonzero(np.asarray(labels) == c)).tolist() for c in range(n_classes)]
    order: list[int] = []
    for rank in range(max((len(p) for p in per_class), default=0)):
        order.extend(p[rank] for p in per_class if rank < len(p))
    return order


def _subset(data: LabelledText, keep: tuple[int, ...] | None) -> LabelledText:
    if keep is None:
        return data
    remap = {old: new for new, old in enumerate(keep)}
    pairs = [(t, remap[y]) for t, y in zip(data.texts, data.labels) if y in remap]
    return LabelledText([t for t, _ in pairs], [y for _, y in pairs], [data.classes[i] for i in keep])


def _without(data: LabelledText, forms: set[str]) -> LabelledText:
    pairs = [(t, y) for t, y in zip(data.texts, data.labels) if visible_forms(t) not in forms]
    return LabelledText([t for t, _ in pairs], [y for _, y in pairs], data.classes)


def task_texts(name: str, root: Path | None = None) -> LabelledText:
    """All labelled texts of task ``name`` before splitting: its class subset, minus inputs of its
    ``disjoint_from`` tasks."""
    spec = TASKS[name]
    data = _subset(spec.load(root), spec.class_subset)
    taken = {visible_forms(t) for other in spec.disjoint_from for t in task_texts(other, root).texts}
    return _without(data, taken) if taken else data


def make_splits(name: str, data: LabelledText, n_train: int, n_val: int, n_test: int, seed: int) -> TaskData:
    """Cut disjoint test, val and train splits (in that priority) from one seeded, class-balanced order."""
    if len(data.texts) < n_test + n_val + 1:
        raise MassMergeError(f"task {name} has {len(data.texts)} texts, fewer than test {n_test} + val {n_val} + 1")
    order = round_robin_order(data.labels, len(data.classes), np.random.default_rng(_seed_for(name, seed)))
    cuts = {"test": order[:n_test], "val": order[n_test:n_test + n_val],
            "train": order[n_test + n_val:n_test + n_val + n_train]}  # fmt: skip
    splits = {k: Split([data.texts[i] for i in v], [data.labels[i] for i in v]) for k, v in cuts.items()}
    return TaskData(name, list(data.classes), (), splits["train"], splits["val"], splits["test"],
                    sizes={k: len(v) for k, v in splits.items()})  # fmt: skip


def load_task(name: str, n_train: int, n_val: int, n_test: int, *, seed: int = 0,
              root: str | Path | None = None) -> TaskData:  # fmt: skip
    """Load task ``name`` from the installed files and split it (seeded, disjoint; val and test capped by the
    task's own maxima)."""
    if name not in TASKS:
        raise OptionError(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
    spec = TASKS[name]
    data = task_texts(name, Path(root) if root is not None else None)
    task = make_splits(name, data, *spec.split_sizes(n_train, n_val, n_test), seed)
    return TaskData(task.name, task.classes, spec.templates, task.train, task.val, task.test,
                    spec.description, task.sizes)  # fmt: skip
