"""Fixtures for the robustness suite (helpers live in robust_helpers.py so tests can import them)."""

from __future__ import annotations

import pytest
from robust_helpers import Zoo, build_zoo


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """Valid and broken checkpoints, built once; tests must not modify them (they write to tmp_path)."""
    return build_zoo(tmp_path_factory.mktemp("zoo"))
