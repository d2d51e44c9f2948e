"""The ``massmerge`` command line: a thin typer app (:mod:`.app`); every command lives in its own module and
does three things: parse its flags, make one library call, print.

``main`` turns any :class:`~massmerge.errors.MassMergeError` into ``error: <one line>`` on stderr and exit
code 2, so users never see a traceback for a bad file or option.
"""

from __future__ import annotations

# each command module registers itself on the app, in the order `massmerge --help` lists them
from massmerge.cli import info as _info  # noqa: F401
from massmerge.cli import merge as _merge  # noqa: F401
from massmerge.cli import build as _build  # noqa: F401
from massmerge.cli import predict as _predict  # noqa: F401
from massmerge.cli import serve as _serve  # noqa: F401
from massmerge.cli import evaluate as _evaluate  # noqa: F401
from massmerge.cli import suite as _suite  # noqa: F401
from massmerge.cli.app import app, main

__all__ = ["app", "main"]
