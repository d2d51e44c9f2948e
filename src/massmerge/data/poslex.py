"""One English word -> its part of speech, from the Penn Treebank lexicon that Debian's ``festlex-poslex`` ships.

A short-input task: the input is a single word ("loudly", "fabricate", "woodrow"). Festival's
``wsj.wp39.poslexR`` lists every word of the Wall Street Journal part of the Penn Treebank (lower-cased) with
the tags it was seen with, one word a line: ``("word" ((tag logprob) ...) () )``. A word is kept only when all
its tags fall into one coarse class (noun, proper name, verb, adjective, adverb), so its label does not depend
on context; words seen with any other tag (numbers, function words, foreign words, symbols) and words of fewer
than :data:`MIN_LETTERS` letters are left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from massmerge.data.common import LabelledText, dedupe, read_text, require

POSLEX = Path("/usr/share/festival/dicts/wsj.wp39.poslexR")
INSTALL = "apt-get install -y festlex-poslex"
MIN_LETTERS = 3

#: Coarse class -> the Penn Treebank tags it covers, in class order.
CLASSES = {"noun": ("nn", "nns"), "proper name": ("nnp", "nnps"),
           "verb": ("vb", "vbd", "vbg", "vbn", "vbp", "vbz"), "adjective": ("jj", "jjr", "jjs"),
           "adverb": ("rb", "rbr", "rbs")}  # fmt: skip
_COARSE = {tag: label for label, tags in enumerate(CLASSES.values()) for tag in tags}
_ENTRY = re.compile(r'^\("(?P<word>[^"]*)" \((?P<tags>.*)\) \(\) \)$')
_TAG = re.compile(r"\((\S+) -?[\d.]+\)")


def lexicon(path: Path) -> Iterator[tuple[str, list[str]]]:
    """Yield (word, tags) for each entry line of a festival ``poslexR`` file (the ``MNCL`` header is skipped)."""
    for line in read_text(require(path, INSTALL)).splitlines():
        match = _ENTRY.match(line.strip())
        if match:
            yield match["word"], _TAG.findall(match["tags"])


def word_pos(path: Path = POSLEX) -> LabelledText:
    """A single English word -> noun, proper name, verb, adjective or adverb (words with one coarse class only)."""
    texts, labels = [], []
    for word, tags in lexicon(path):
        coarse = {_COARSE.get(tag, -1) for tag in tags}
        if len(coarse) == 1 and -1 not in coarse and len(word) >= MIN_LETTERS and word.isalpha():
            texts.append(word)
            labels.append(coarse.pop())
    texts, labels = dedupe(texts, labels)
    return LabelledText(texts, labels, list(CLASSES))
