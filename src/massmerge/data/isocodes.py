"""A place name -> its country, from the ISO 3166-2 subdivision list that Debian's ``iso-codes`` ships.

A short-input task (1-3 words: "Bouches-du-Rhône", "Chon Buri", "Barking and Dagenham"). Each entry of
``iso_3166-2.json`` has a code ``CC-XXX`` whose first two letters are the country. Ten countries with many
subdivisions are kept (every one with at least 60 names after cleaning). Latvia, which has more, is left out: all
its names end in "novads", which would make the class a suffix lookup. Names lose ISO's annotations (alternative
names in brackets, notes in parentheses, trailing asterisks), which are not part of the place name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from massmerge.data.common import LabelledText, clean, dedupe, require

ISO_3166_2 = Path("/usr/share/iso-codes/json/iso_3166-2.json")
INSTALL = "apt-get install -y iso-codes"

#: ISO 3166-1 alpha-2 code -> class name (a plain English country name, for the zero-shot prompts).
COUNTRIES = {"FR": "France", "IT": "Italy", "ES": "Spain", "GB": "United Kingdom", "RU": "Russia",
             "TR": "Turkey", "TH": "Thailand", "PH": "Philippines", "UG": "Uganda", "SI": "Slovenia"}  # fmt: skip
_NOTE = re.compile(r"\s*(\[[^\]]*\]|\([^)]*\))")


def place_name(name: str) -> str:
    """An ISO subdivision name without bracketed alternatives, parenthesised notes or a trailing ``*``."""
    return clean(_NOTE.sub("", name)).rstrip("*").strip()


def place_country(path: Path = ISO_3166_2) -> LabelledText:
    """A subdivision name (region, province, district, ...) -> one of 10 countries."""
    codes = list(COUNTRIES)
    entries = json.loads(require(path, INSTALL).read_text(encoding="utf-8"))["3166-2"]
    texts, labels = [], []
    for entry in entries:
        country = entry["code"].split("-", 1)[0]
        if country in COUNTRIES and place_name(entry["name"]):
            texts.append(place_name(entry["name"]))
            labels.append(codes.index(country))
    texts, labels = dedupe(texts, labels)
    return LabelledText(texts, labels, list(COUNTRIES.values()))
