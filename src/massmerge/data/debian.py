"""Debian package descriptions -> archive section, and -> what the package is used for (debtags ``use::``).

Read from a snapshot of ``apt-cache dumpavail`` taken once by the set-up script, so the task does not drift when
the machine's package lists are updated. Only the one-line description is the input: the package name would give
the answer away (``python3-*``, ``lib*``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from massmerge.data.common import LabelledText, clean, data_dir, dedupe
from massmerge.errors import MassMergeError

SNAPSHOT = Path("debian") / "dumpavail.txt"

#: Application areas (10 sections) and programming ecosystems (10 sections): two disjoint label sets.
SECTIONS_APPS = ["admin", "editors", "games", "graphics", "mail", "math", "net", "science", "sound", "video"]
SECTIONS_LANGS = ["haskell", "rust", "golang", "javascript", "java", "ruby", "gnu-r", "php", "ocaml", "perl"]
#: debtags ``use::`` facet values and their class names.
USES = {"gameplaying": "playing games", "converting": "converting files", "editing": "editing",
        "checking": "checking and testing", "viewing": "viewing", "monitor": "monitoring",
        "configuring": "configuring", "playing": "playing media"}  # fmt: skip


def install_command(root: Path) -> str:
    """The command that writes the snapshot where :func:`find_snapshot` looks."""
    return f"mkdir -p {(root / SNAPSHOT).parent} && apt-get update && apt-cache dumpavail > {root / SNAPSHOT}"


def find_snapshot(root: Path | None = None) -> Path:
    """The dumpavail snapshot under the data directory, or a one-line error saying how to make it."""
    root = data_dir(root)
    path = root / SNAPSHOT
    if not path.exists() or path.stat().st_size == 0:
        raise MassMergeError(f"missing {path}: make it with `{install_command(root)}`")
    return path


def paragraphs(path: Path) -> Iterator[dict[str, str]]:
    """Yield each package stanza as {field: value}; continuation lines are appended to their field."""
    record: dict[str, str] = {}
    field = ""
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                if record:
                    yield record
                record, field = {}, ""
            elif line[0] in " \t" and field:
                record[field] += " " + line.strip()
            elif ":" in line:
                field, _, value = line.partition(":")
                record[field] = value.strip()
    if record:
        yield record


def _section(record: dict[str, str]) -> str:
    return record.get("Section", "").split("/")[-1]


def _by_section(sections: list[str], root: Path | None) -> LabelledText:
    texts, labels = [], []
    for record in paragraphs(find_snapshot(root)):
        section = _section(record)
        if section in sections and record.get("Description"):
            texts.append(clean(record["Description"]))
            labels.append(sections.index(section))
    texts, labels = dedupe(texts, labels)
    return LabelledText(texts, labels, sections)


def sections_apps(root: Path | None = None) -> LabelledText:
    """Package description -> one of 10 application-area sections (games, sound, mail, ...)."""
    return _by_section(SECTIONS_APPS, root)


def sections_langs(root: Path | None = None) -> LabelledText:
    """Package description -> one of 10 language-ecosystem sections (haskell, rust, ...)."""
    lang_names = {"gnu-r": "R", "golang": "go"}
    data = _by_section(SECTIONS_LANGS, root)
    return LabelledText(data.texts, data.labels, [lang_names.get(s, s) for s in SECTIONS_LANGS])


def uses(root: Path | None = None) -> LabelledText:
    """Package description -> its single debtags ``use::`` value among 8 (packages with one such tag only)."""
    keys = list(USES)
    texts, labels = [], []
    for record in paragraphs(find_snapshot(root)):
        tags = [t.strip() for t in record.get("Tag", "").split(",")]
        values = [t[5:] for t in tags if t.startswith("use::")]
        if len(values) == 1 and values[0] in USES and record.get("Description"):
            texts.append(clean(record["Description"]))
            labels.append(keys.index(values[0]))
    texts, labels = dedupe(texts, labels)
    return LabelledText(texts, labels, list(USES.values()))
