"""Shared pieces of the offline suite's loaders: the labelled-text container, the data directory, file checks.

Why one place: every loader must fail the same way when its package is missing (one line naming the file and the
exact install command), and every loader returns the same shape so the task registry can treat them alike.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from massmerge.errors import MassMergeError

#: The command that installs every Debian package and npm tarball the suite reads.
SETUP_COMMAND = "bash scripts/setup_data.sh"

_DATA_ENV = "MASSMERGE_DATA_DIR"


@dataclass(frozen=True)
class LabelledText:
    """Texts with integer labels indexing ``classes`` (the dataset's class order, which heads must follow)."""

    texts: list[str]
    labels: list[int]
    classes: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError("texts and labels differ in length")


def data_dir(override: str | Path | None = None) -> Path:
    """Where the npm tarball and the apt snapshot live: ``override``, else $MASSMERGE_DATA_DIR, else ~/.local/share."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(_DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "massmerge" / "data"


def require(path: Path, install: str) -> Path:
    """Return ``path`` if it exists, else raise a one-line error naming it and the command that installs it."""
    if not path.exists():
        raise MassMergeError(f"missing {path}: install it with `{install}` (or run `{SETUP_COMMAND}`)")
    return path


def read_text(path: Path) -> str:
    """Read a text file that may be UTF-8 or Latin-1 (old fortune files are either)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


_OVERSTRIKE = re.compile(r".\x08")
_SPACE = re.compile(r"\s+")


def clean(text: str) -> str:
    """Drop terminal overstriking (``_\\bX``) and collapse whitespace: the model sees plain one-line text."""
    return _SPACE.sub(" ", _OVERSTRIKE.sub("", text)).strip()


_COMBINING = re.compile(r"[\u0300-\u036f]")


def visible_forms(text: str) -> str:
    """``text`` as the uncased MiniLM tokenizer sees it: case-folded, accents removed. Two inputs with one visible
    form are one input to the model; fast on a whole file at once (line breaks are kept)."""
    return _COMBINING.sub("", unicodedata.normalize("NFD", text.casefold()))


def dedupe(texts: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    """Keep the first copy of each text and drop texts seen with two labels, so no text crosses splits."""
    first: dict[str, int] = {}
    conflicted: set[str] = set()
    for text, label in zip(texts, labels):
        if text in first and first[text] != label:
            conflicted.add(text)
        first.setdefault(text, label)
    kept = [(t, y) for t, y in first.items() if t not in conflicted]
    return [t for t, _ in kept], [y for _, y in kept]
