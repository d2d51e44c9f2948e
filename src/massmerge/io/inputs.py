"""Inputs users hand to a command: text files read line by line, JSON lines, and what a path that is not a
regular file is, each problem one line naming the file (and the line).
"""

from __future__ import annotations

import stat
from pathlib import Path

from massmerge.errors import MassMergeError
from massmerge.io.jsonfile import parse_json_text


def describe(path: Path) -> str:
    """What a path that is not a regular file is, for error messages."""
    if not path.exists():
        return "no such file or directory"
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    return "is not a regular file"


def read_utf8_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of every line of a UTF-8 file (a user's inputs or config); a path that is
    not a regular file says what it is, and a bad byte names the file and the line.

    Why not ``read_text``: its UnicodeDecodeError gives a byte offset in a traceback, not a line to fix.
    """
    if not path.is_file():
        raise MassMergeError(f"{path}: {describe(path)}")
    out = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                out.append((number, raw.decode("utf-8").rstrip("\r\n")))
            except UnicodeDecodeError as exc:
                raise MassMergeError(f"{path}: line {number} is not valid UTF-8 (byte {exc.start + 1} of the "
                                     "line)") from None
    return out



def read_text_inputs(path: Path) -> list[tuple[int, str]]:
    """(line number, text) from a plain text file (non-blank lines) or JSON lines (a string or {"text": ...})."""
    lines = [(n, line) for n, line in read_utf8_lines(path) if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    texts = []
    for number, line in lines:
        where = f"{path}: line {number}"
        item = parse_json_text(line, where)  # nesting depth bounded: a hostile line cannot recurse deeply
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise MassMergeError(f"{where} has no string 'text' field")
        texts.append((number, text))
    return texts



__all__ = ["describe", "read_text_inputs", "read_utf8_lines"]
