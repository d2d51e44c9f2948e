"""Lazy package exports (PEP 562): a package names what it offers without importing it.

Why: ``massmerge --help`` and the CLI's option defaults read small torch-free modules; a package ``__init__``
that imported its torch-heavy members eagerly would make every command pay for torch before parsing a flag.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``exports[name]`` (a module path) on first access of ``name``."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(exports[name]), name)

    return __getattr__
