"""An emoji's name -> its emoji group, from ``emoji-test.txt`` as Debian's ``unicode-data`` ships it.

A short-input task (1-4 words: "grinning face", "hot pepper", "ATM sign"). The file lists every emoji under
``# group:`` and ``# subgroup:`` headings, one per line as ``code points ; status # emoji version name``. Only
``fully-qualified`` lines are read (the other statuses repeat the same names), and left out are:

- skin-tone variants ("waving hand: medium skin tone"), copies of their base emoji's name;
- the groups "Component" (skin tones and hair styles alone) and "Flags" (every name starts with "flag:", which
  names the group).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from massmerge.data.common import LabelledText, clean, dedupe, require

EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
INSTALL = "apt-get install -y unicode-data"

#: Unicode group -> readable class name, in the file's group order.
GROUPS = {"Smileys & Emotion": "smileys and emotions", "People & Body": "people and body parts",
          "Animals & Nature": "animals and nature", "Food & Drink": "food and drink",
          "Travel & Places": "travel and places", "Activities": "activities and sports", "Objects": "objects",
          "Symbols": "symbols and signs"}  # fmt: skip
_SKIN_TONE = "skin tone"


def emoji_names(path: Path) -> Iterator[tuple[str, str]]:
    """Yield (group, name) for each fully-qualified emoji line of an ``emoji-test.txt`` file."""
    group = ""
    for line in require(path, INSTALL).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif not line.startswith("#") and ";" in line and "#" in line:
            status, comment = line.split(";", 1)[1].split("#", 1)
            fields = comment.split(maxsplit=2)  # emoji, version ("E1.0"), name
            if status.strip() == "fully-qualified" and len(fields) == 3:
                yield group, clean(fields[2])


def emoji_group(path: Path = EMOJI_TEST) -> LabelledText:
    """An emoji name -> one of 8 groups (smileys, people, animals, food, travel, activities, objects, symbols)."""
    groups = list(GROUPS)
    texts, labels = [], []
    for group, name in emoji_names(path):
        if group in GROUPS and _SKIN_TONE not in name:
            texts.append(name)
            labels.append(groups.index(group))
    texts, labels = dedupe(texts, labels)
    return LabelledText(texts, labels, list(GROUPS.values()))
