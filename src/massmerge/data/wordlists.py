"""One word -> its language, from Debian's spelling word lists (``wfrench``, ``wngerman``, ... in /usr/share/dict).

A short-input task: the input is a single word, so whatever tells the task apart has to come from a few
word pieces. A word list is a list of valid words of one language (inflected forms included), so the label is the
list the word comes from. Only what makes that label well defined is kept:

- lower-case alphabetic words of at least :data:`MIN_LETTERS` letters (capitalised entries are names and
  acronyms; very short words are shared by many languages);
- words whose *model-visible* form (case-folded, accents stripped: what the uncased MiniLM tokenizer sees)
  occurs in one list only, checked against every entry of every list of the task and of the English list, so no
  input is also a word of another class or an English word (the suite's English tasks read English words);
- a fixed seeded sample of :data:`PER_LANGUAGE` words per language.

Eight languages of two families (Romance, Germanic), so the task is learnable but not a script lookup. Polish
is left out on purpose: its list holds 4.3 million inflected forms (60 MB), which would make this the slowest
loader of the suite by far.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from massmerge.data.common import LabelledText, dedupe, read_text, require, visible_forms

DICT_DIR = Path("/usr/share/dict")
MIN_LETTERS = 4
PER_LANGUAGE = 700
SAMPLE_SEED = 0  # fixed: the sample is part of the task's definition, not of a split

#: Class name -> (file under /usr/share/dict, Debian package), in class order.
LANGUAGES = {"French": ("french", "wfrench"), "Spanish": ("spanish", "wspanish"), "Italian": ("italian", "witalian"),
             "Portuguese": ("portuguese", "wportuguese"), "German": ("ngerman", "wngerman"),
             "Dutch": ("dutch", "wdutch"), "Swedish": ("swedish", "wswedish"),
             "Danish": ("danish", "wdanish")}  # fmt: skip
#: Words also in this list are English words too, and are dropped.
ENGLISH = ("american-english", "wamerican")


def _install(package: str) -> str:
    return f"apt-get install -y {package}"


def read_list(path: Path) -> tuple[dict[str, str], set[str]]:
    """The usable words of one list (lower-case, alphabetic, :data:`MIN_LETTERS`+ letters) with their visible
    forms, and the visible forms of all its entries (names and short words make a form ambiguous all the same)."""
    text = read_text(path)
    lines, forms = text.split("\n"), visible_forms(text).split("\n")
    usable = {w: f for w, f in zip(lines, forms) if len(w) >= MIN_LETTERS and w.isalpha() and w.islower()}
    return usable, set(forms)


def word_language(root: Path = DICT_DIR, per_language: int = PER_LANGUAGE) -> LabelledText:
    """A single word -> one of 8 languages (French, Spanish, Italian, Portuguese, German, Dutch, Swedish, Danish)."""
    lists = {name: read_list(require(root / file, _install(pkg))) for name, (file, pkg) in LANGUAGES.items()}
    _, english = read_list(require(root / ENGLISH[0], _install(ENGLISH[1])))
    owners = Counter(form for forms in [*(f for _, f in lists.values()), english] for form in forms)
    texts, labels = [], []
    for label, (usable, _) in enumerate(lists.values()):
        unique = sorted(w for w, form in usable.items() if owners[form] == 1)
        rng = np.random.default_rng([SAMPLE_SEED, label])  # one stream per language: lists change independently
        chosen = [unique[i] for i in sorted(rng.permutation(len(unique))[:per_language])]
        texts += chosen
        labels += [label] * len(chosen)
    texts, labels = dedupe(texts, labels)
    return LabelledText(texts, labels, list(LANGUAGES))
