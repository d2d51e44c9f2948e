"""WordNet tasks from Debian's ``wordnet-base``: noun and verb supersenses, and the part of speech of a gloss.

The supersense of a synset is its lexicographer file (``lex_filenum`` in ``data.<pos>``); the numbering is fixed
by the WordNet database format (lexnames(5WN)), so the names are listed here rather than read from a file that
``wordnet-base`` does not ship.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from massmerge.data.common import LabelledText, clean, dedupe, require

WORDNET_DIR = Path("/usr/share/wordnet")
INSTALL = "apt-get install -y wordnet-base"

LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]  # fmt: skip

#: Readable noun class names for the zero-shot prompts (the head is built from these words).
_READABLE = {"Tops": "general concept", "act": "action", "artifact": "man-made object", "body": "body part",
             "communication": "communication", "person": "person", "possession": "possession or money"}
_POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adjective": "data.adj", "adverb": "data.adv"}


def _synsets(path: Path) -> Iterator[tuple[int, str, str]]:
    """Yield (lex_filenum, first lemma, gloss) for each synset line of a ``data.<pos>`` file."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("  ") or "|" not in line:
                continue  # the license header is indented by two spaces
            head, gloss = line.split("|", 1)
            fields = head.split()
            yield int(fields[1]), fields[4].replace("_", " "), clean(gloss)


def _supersense(pos: str, root: Path) -> LabelledText:
    path = require(root / _POS_FILES[pos], INSTALL)
    prefix = "noun." if pos == "noun" else "verb."
    names = [n for n in LEXNAMES if n.startswith(prefix)]
    texts, labels = [], []
    for lexnum, lemma, gloss in _synsets(path):
        name = LEXNAMES[lexnum]
        if name in names:
            texts.append(f"{lemma}: {gloss}")
            labels.append(names.index(name))
    texts, labels = dedupe(texts, labels)
    readable = _READABLE if pos == "noun" else {}
    classes = [readable.get(n.split(".")[1], n.split(".")[1]) for n in names]
    return LabelledText(texts, labels, classes)


def noun_supersenses(root: Path = WORDNET_DIR) -> LabelledText:
    """'lemma: gloss' of every noun synset -> one of 26 noun supersenses."""
    return _supersense("noun", root)


def verb_supersenses(root: Path = WORDNET_DIR) -> LabelledText:
    """'lemma: gloss' of every verb synset -> one of 15 verb supersenses."""
    return _supersense("verb", root)


def gloss_pos(root: Path = WORDNET_DIR) -> LabelledText:
    """A gloss alone (definition and examples, no lemma) -> noun, verb, adjective or adverb."""
    classes = list(_POS_FILES)
    texts, labels = [], []
    for label, pos in enumerate(classes):
        for _, _, gloss in _synsets(require(root / _POS_FILES[pos], INSTALL)):
            texts.append(gloss)
            labels.append(label)
    texts, labels = dedupe(texts, labels)
    return LabelledText(texts, labels, classes)
