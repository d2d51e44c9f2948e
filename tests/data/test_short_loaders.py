"""The short-input loaders (word lists, ISO 3166-2, emoji names, Penn Treebank words) on tiny files in the real
formats: their labels, what they leave out, dedupe, and their one-line errors when a file is missing."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from massmerge.data import emoji, isocodes, poslex, wordlists
from massmerge.data.common import LabelledText, visible_forms
from massmerge.errors import MassMergeError

# --- word lists (/usr/share/dict) ---------------------------------------------------------------------------------

#: Per list: words only that language has (usable), plus the shared and unusable entries each test adds.
OWN = {"French": ["fromage", "boulangerie", "château"], "Spanish": ["queso", "panadería", "sombrero"],
       "Italian": ["formaggio", "panetteria", "gelato"], "Portuguese": ["queijo", "padaria", "saudade"],
       "German": ["käsig", "backen", "gemütlich"], "Dutch": ["kaasje", "bakkerij", "gezellig"],
       "Swedish": ["ostbit", "bageri", "smörgås"], "Danish": ["ostemad", "bageriet", "hyggelig"]}  # fmt: skip


def _dict_dir(root: Path, extra: dict[str, list[str]] | None = None) -> Path:
    root.mkdir()
    for name, (file, _) in wordlists.LANGUAGES.items():
        lines = OWN[name] + (extra or {}).get(name, [])
        encoding = "latin-1" if name == "Swedish" else "utf-8"  # Debian's swedish list is ISO-8859-1
        (root / file).write_bytes("\n".join(lines + [""]).encode(encoding))
    (root / wordlists.ENGLISH[0]).write_text("cheese\nbakery\nParis\nrapide\n")
    return root


def _by_text(data: LabelledText) -> dict[str, str]:
    return {t: data.classes[y] for t, y in zip(data.texts, data.labels)}


def test_word_language_labels_each_word_by_its_list(tmp_path: Path) -> None:
    data = wordlists.word_language(_dict_dir(tmp_path / "dict"))
    assert data.classes == list(wordlists.LANGUAGES)
    assert _by_text(data) == {w: name for name, words in OWN.items() for w in words}  # latin-1 "smörgås" read


def test_word_language_drops_words_of_two_lists_as_the_uncased_model_sees_them(tmp_path: Path) -> None:
    extra = {"French": ["café", "rapide", "Bonjour", "abc", "peut-être", "Lyon"],
             "Spanish": ["cafe", "lyon"]}  # fmt: skip
    pairs = _by_text(wordlists.word_language(_dict_dir(tmp_path / "dict", extra)))
    assert "café" not in pairs and "cafe" not in pairs  # one visible form "cafe" in two lists
    assert "rapide" not in pairs  # also an English word
    assert "lyon" not in pairs  # a capitalised entry of another list still makes the form ambiguous
    assert not {"Bonjour", "abc", "peut-être"} & set(pairs)  # capitalised, too short, not alphabetic
    assert "fromage" in pairs


def test_word_language_sample_is_fixed_and_per_language(tmp_path: Path) -> None:
    extra = {"French": [f"motfrancais{chr(97 + i)}{chr(97 + j)}" for i in range(5) for j in range(6)]}
    root = _dict_dir(tmp_path / "dict", extra)
    a = wordlists.word_language(root, per_language=3)
    assert Counter(a.labels) == {label: 3 for label in range(8)}
    assert a.texts == wordlists.word_language(root, per_language=3).texts
    french = [t for t, y in zip(a.texts, a.labels) if y == 0]
    assert set(french) < set(OWN["French"] + extra["French"])


def test_word_language_missing_list_names_file_and_package(tmp_path: Path) -> None:
    root = _dict_dir(tmp_path / "dict")
    (root / "dutch").unlink()
    with pytest.raises(MassMergeError, match=r"dutch.*apt-get install -y wdutch"):
        wordlists.word_language(root)


def test_visible_forms_fold_case_and_accents_but_keep_lines() -> None:
    assert visible_forms("Château\nPANADERÍA\nsmörgås") == "chateau\npanaderia\nsmorgas"


# --- ISO 3166-2 subdivisions (iso-codes) --------------------------------------------------------------------------


def _iso(path: Path) -> Path:
    entries = [{"code": "FR-13", "name": "Bouches-du-Rhône", "type": "Metropolitan department"},
               {"code": "ES-A", "name": "Alacant*", "type": "Province"},
               {"code": "ES-C", "name": "A Coruña [La Coruña]", "type": "Province"},
               {"code": "PH-01", "name": "Ilocos (Region I)", "type": "Region"},
               {"code": "GB-LND", "name": "London, City of", "type": "City corporation"},
               {"code": "TH-10", "name": "Krung Thep Maha Nakhon", "type": "Metropolitan administration"},
               {"code": "DE-BY", "name": "Bayern", "type": "Land"},  # a country the task does not use
               {"code": "IT-CA", "name": "Georgia", "type": "Province"},  # made up: a name in two countries
               {"code": "RU-KHA", "name": "Georgia", "type": "Administrative territory"},
               {"code": "TR-06", "name": "Ankara", "type": "Province"},
               {"code": "TR-06", "name": "Ankara", "type": "Province"}]  # fmt: skip
    path.write_text(json.dumps({"3166-2": entries}, ensure_ascii=False), encoding="utf-8")
    return path


def test_place_country_labels_names_by_code_prefix_and_cleans_iso_notes(tmp_path: Path) -> None:
    data = isocodes.place_country(_iso(tmp_path / "iso_3166-2.json"))
    assert data.classes == list(isocodes.COUNTRIES.values()) and len(data.classes) == 10
    assert _by_text(data) == {"Bouches-du-Rhône": "France", "Alacant": "Spain", "A Coruña": "Spain",
                              "Ilocos": "Philippines", "London, City of": "United Kingdom",
                              "Krung Thep Maha Nakhon": "Thailand", "Ankara": "Turkey"}  # fmt: skip


def test_place_country_missing_file_says_iso_codes(tmp_path: Path) -> None:
    with pytest.raises(MassMergeError, match=r"iso_3166-2\.json.*apt-get install -y iso-codes"):
        isocodes.place_country(tmp_path / "iso_3166-2.json")


# --- emoji names (unicode-data) -----------------------------------------------------------------------------------

EMOJI_TEST = """# emoji-test.txt
# Version: 15.0

# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face

# group: People & Body

# subgroup: hand-fingers-open
1F44B                                                  ; fully-qualified     # 👋 E0.6 waving hand
1F44B 1F3FD                                            ; fully-qualified     # 👋🏽 E1.0 waving hand: medium skin tone
1F9D1 200D 1F33E                                       ; fully-qualified     # 🧑‍🌾 E12.1 farmer

# group: Component

1F3FB                                                  ; component           # 🏻 E1.0 light skin tone

# group: Animals & Nature

1F412                                                  ; fully-qualified     # 🐒 E0.6 monkey
1F415 200D 1F9BA                                       ; fully-qualified     # 🐕‍🦺 E12.0 service dog

# group: Symbols

1F3E7                                                  ; fully-qualified     # 🏧 E0.6 ATM sign
1F3E7                                                  ; fully-qualified     # 🏧 E0.6 ATM sign

# group: Flags

1F3C1                                                  ; fully-qualified     # 🏁 E0.6 chequered flag
1F1EB 1F1F7                                            ; fully-qualified     # 🇫🇷 E0.6 flag: France

#EOF
"""


def test_emoji_group_reads_fully_qualified_names_under_their_group(tmp_path: Path) -> None:
    path = tmp_path / "emoji-test.txt"
    path.write_text(EMOJI_TEST, encoding="utf-8")
    data = emoji.emoji_group(path)
    assert data.classes == list(emoji.GROUPS.values()) and len(data.classes) == 8
    assert _by_text(data) == {"grinning face": "smileys and emotions", "smiling face": "smileys and emotions",
                              "waving hand": "people and body parts", "farmer": "people and body parts",
                              "monkey": "animals and nature", "service dog": "animals and nature",
                              "ATM sign": "symbols and signs"}  # no skin tones, components or flags  # fmt: skip


def test_emoji_group_missing_file_says_unicode_data(tmp_path: Path) -> None:
    with pytest.raises(MassMergeError, match=r"emoji-test\.txt.*apt-get install -y unicode-data"):
        emoji.emoji_group(tmp_path / "emoji-test.txt")


# --- Penn Treebank words (festlex-poslex) -------------------------------------------------------------------------

POSLEX = """MNCL
("!" ((punc -7.515) ) () )
("'80s" ((cd -9.769) (nns -9.562) ) () )
("ab" ((nn -9.000) ) () )
("banish" ((vb -9.463) ) () )
("fabricated" ((vbd -9.1) (vbn -8.2) ) () )
("loudly" ((rb -8.102) ) () )
("nikolai" ((nnp -10.709) ) () )
("pentameter" ((nn -11.5) ) () )
("shaggy" ((jj -10.9) ) () )
("cluster" ((nn -9.2) (vb -10.3) ) () )
("lanzador" ((fw -10.0) (nn -11.0) ) () )
("which" ((wdt -0.664) ) () )
("after" ((1 -4.727) (in -4.017) (rb -8.102) ) () )
("well-known" ((jj -9.0) ) () )
"""


def test_word_pos_keeps_words_whose_tags_share_one_coarse_class(tmp_path: Path) -> None:
    path = tmp_path / "wsj.wp39.poslexR"
    path.write_text(POSLEX, encoding="latin-1")
    data = poslex.word_pos(path)
    assert data.classes == ["noun", "proper name", "verb", "adjective", "adverb"]
    assert _by_text(data) == {"banish": "verb", "fabricated": "verb", "loudly": "adverb", "nikolai": "proper name",
                              "pentameter": "noun", "shaggy": "adjective"}  # fmt: skip


def test_word_pos_missing_file_says_festlex_poslex(tmp_path: Path) -> None:
    with pytest.raises(MassMergeError, match=r"wsj\.wp39\.poslexR.*apt-get install -y festlex-poslex"):
        poslex.word_pos(tmp_path / "wsj.wp39.poslexR")
