"""One exception type for every problem a user can fix.

The CLI turns a :class:`MassMergeError` into a one-line message on stderr and exit code 2, so every
message must name the file, key or option at fault and make sense without a traceback.
"""

from __future__ import annotations


class MassMergeError(Exception):
    """A user-facing error: bad input file, incompatible checkpoints or an invalid option."""


class CheckpointError(MassMergeError):
    """A checkpoint cannot be read or does not match the base model (names the file and key)."""


class OptionError(MassMergeError):
    """An option value is out of range or inconsistent (names the option)."""


def first_validation_error(exc: Exception) -> tuple[str, str, object]:
    """(dotted field location, message, offending input) of a pydantic ``ValidationError``'s first error: the
    one that a one-line message names (every caller words its own line around it)."""
    first = exc.errors()[0]  # type: ignore[attr-defined]
    return ".".join(str(part) for part in first["loc"]), str(first["msg"]), first.get("input")
