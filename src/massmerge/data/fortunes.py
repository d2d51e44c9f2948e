"""Quote tasks from Debian's fortune packages: topic of an English quote, topic of a Spanish one, language.

Each fortune file holds entries separated by a line that is just ``%``; the file name is the category.
"""

from __future__ import annotations

from pathlib import Path

from massmerge.errors import MassMergeError
from massmerge.data.common import LabelledText, clean, dedupe, read_text, require

FORTUNE_DIR = Path("/usr/share/games/fortunes")
_MIN_CHARS = 12

#: English topics, two disjoint sets of 8 categories of the ``fortunes`` package: (file, class name).
TOPICS_A = [("computers", "computers"), ("definitions", "definitions"), ("people", "people"),
            ("politics", "politics"), ("science", "science"), ("songs-poems", "songs and poems"),
            ("work", "work"), ("men-women", "men and women")]  # fmt: skip
TOPICS_B = [("art", "art"), ("law", "law"), ("literature", "literature"), ("food", "food"),
            ("drugs", "drugs"), ("education", "education"), ("startrek", "star trek"), ("love", "love")]  # fmt: skip
#: Spanish topics of ``fortunes-es`` (class names in English: the backbone is an English encoder).
TOPICS_ES = [("sentimientos.fortunes", "feelings"), ("arte.fortunes", "art"), ("vida.fortunes", "life"),
             ("poder.fortunes", "power"), ("ciencia.fortunes", "science"), ("informatica.fortunes", "computers"),
             ("libertad.fortunes", "freedom"), ("familia.fortunes", "family")]  # fmt: skip
#: Language -> (sub-directory or None for the English top level, Debian package).
LANGUAGES = {"english": (None, "fortunes"), "german": ("de", "fortunes-de"), "spanish": ("es", "fortunes-es"),
             "italian": ("it", "fortunes-it"), "portuguese": (None, "fortunes-br"), "polish": ("pl", "fortunes-pl"),
             "czech": ("cs", "fortunes-cs"), "esperanto": ("eo", "fortunes-eo")}  # fmt: skip
_ENGLISH_FILES = [f for f, _ in TOPICS_A + TOPICS_B] + ["cookie", "people", "miscellaneous", "wisdom", "zippy"]


def entries(path: Path) -> list[str]:
    """The cleaned entries of one fortune file (split on lines holding only ``%``)."""
    chunks = read_text(path).replace("\r\n", "\n").split("\n%\n")
    return [c for c in (clean(chunk.strip("%\n")) for chunk in chunks) if len(c) >= _MIN_CHARS]


def _install(package: str) -> str:
    return f"apt-get install -y {package}"


def _topics(categories: list[tuple[str, str]], root: Path, package: str) -> LabelledText:
    texts, labels = [], []
    for label, (name, _) in enumerate(categories):
        for entry in entries(require(root / name, _install(package))):
            texts.append(entry)
            labels.append(label)
    texts, labels = dedupe(texts, labels)
    return LabelledText(texts, labels, [c for _, c in categories])


def topics_a(root: Path = FORTUNE_DIR) -> LabelledText:
    """English quote -> one of 8 topics (computers, definitions, people, ...)."""
    return _topics(TOPICS_A, root, "fortunes")


def topics_b(root: Path = FORTUNE_DIR) -> LabelledText:
    """English quote -> one of 8 other topics (art, law, literature, ...), disjoint from :func:`topics_a`."""
    return _topics(TOPICS_B, root, "fortunes")


def topics_es(root: Path = FORTUNE_DIR) -> LabelledText:
    """Spanish quote -> one of 8 topics (feelings, art, life, ...)."""
    return _topics(TOPICS_ES, root / "es", "fortunes-es")


def _language_files(language: str, root: Path) -> list[Path]:
    sub, package = LANGUAGES[language]
    if language == "english":
        return [require(root / f, _install(package)) for f in dict.fromkeys(_ENGLISH_FILES)]
    if language == "portuguese":
        return [require(root / "brasil", _install(package))]
    folder = require(root / sub, _install(package))
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix not in {".dat", ".u8"})
    if not files:
        raise MassMergeError(f"no fortune files in {folder}: install them with `{_install(package)}`")
    return files


def language(root: Path = FORTUNE_DIR, per_language: int = 4000) -> LabelledText:
    """A quote -> its language, among 8 (English, German, Spanish, Italian, Portuguese, Polish, Czech, Esperanto).

    At most ``per_language`` entries per language are kept (the first ones in file order), which bounds the
    loading work without changing which texts exist.
    """
    classes = list(LANGUAGES)
    texts, labels = [], []
    for label, name in enumerate(classes):
        seen: set[Path] = set()
        kept: list[str] = []
        for path in _language_files(name, root):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            kept.extend(entries(path))
        for entry in kept[::max(1, len(kept) // per_language)][:per_language]:
            texts.append(entry)
            labels.append(label)
    texts, labels = dedupe(texts, labels)
    return LabelledText(texts, labels, classes)
