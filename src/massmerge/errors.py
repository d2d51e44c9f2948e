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
