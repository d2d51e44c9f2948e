"""JSON from users and strangers (manifests, model configs, input lines): bounded size and nesting, UTF-8.

Why bounded: a hostile file must not exhaust memory (size) or reach the interpreter's recursion limit (depth)
before massmerge can name it in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from massmerge.errors import MassMergeError

MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 32


def parse_json_text(text: str, where: str) -> Any:
    """JSON with a bounded nesting depth; a failure is one :class:`MassMergeError` naming ``where``."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                raise MassMergeError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        elif char in "]}":
            depth -= 1
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MassMergeError(f"{where}: not valid JSON ({str(exc).splitlines()[0][:160]})") from None


def read_json_file(path: Path, what: str, error: type[MassMergeError] = MassMergeError) -> Any:
    """A JSON file from a user or a stranger: at most :data:`MAX_JSON_BYTES` of UTF-8, bounded nesting; every
    failure is one ``error`` line naming the file (``what`` says what it should have been)."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise error(f"{path}: {path.stat().st_size} bytes is too large for {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not readable UTF-8 text ({type(exc).__name__})") from None
    return parse_json_text(text, str(path))


__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "parse_json_text", "read_json_file"]
