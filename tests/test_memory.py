"""memory.py: the allocator calls are safe to make, and they work where glibc provides them."""

from __future__ import annotations

import sys

import pytest
import torch

from massmerge import memory
from massmerge.mass.experts import ExpertFactors


def test_calls_are_safe_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    memory._glibc.cache_clear()
    monkeypatch.setattr(sys, "platform", "darwin")
    try:
        assert memory.release_freed_memory() is False
        assert memory.tune_allocator_for_streaming() is False
    finally:
        memory._glibc.cache_clear()


@pytest.mark.skipif(not sys.platform.startswith("linux") or memory._glibc() is None, reason="glibc only")
def test_glibc_accepts_the_calls() -> None:
    assert memory.release_freed_memory() is True
    assert memory.tune_allocator_for_streaming() is True


def test_build_releases_memory_after_each_expert(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr("massmerge.mass.experts.release_freed_memory", lambda: calls.append(1) or True)
    vectors = [{"w": torch.randn(6, 4)} for _ in range(3)]
    ExpertFactors.build(iter(vectors), ["a", "b", "c"], eps=None)
    assert len(calls) == 3
