"""Fixtures of the server tests (helpers: server_fixtures.py; the test modules skip without the serve extra)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def text_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT (word-level tokenizer) with 3 perturbed experts, built by ``massmerge build``."""
    from server_fixtures import build_text_artifact

    return build_text_artifact(tmp_path_factory.mktemp("serve_text"))
