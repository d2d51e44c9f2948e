"""Fixtures for the robustness suite (helpers live in robust_helpers.py so tests can import them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from robust_helpers import Zoo, build_artifact_once, build_text_zoo, build_zoo


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """Valid and broken checkpoints, built once; tests must not modify them (they write to tmp_path)."""
    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def text_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT base with tokenizer, its experts and heads files (see robust_helpers.build_text_zoo)."""
    pytest.importorskip("transformers")
    return build_text_zoo(tmp_path_factory.mktemp("text_zoo"))


@pytest.fixture(scope="session")
def artifact(text_zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact built by ``massmerge build`` (tasks t1, t2), shared: copy it before changing anything."""
    return build_artifact_once(text_zoo, tmp_path_factory.mktemp("art") / "art")
