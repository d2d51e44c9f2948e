"""A model repo's weights are fetched in one format: safetensors where the repo has them, else its pickle.

The download functions of huggingface_hub are replaced by recorders (no network here), so the test sees exactly
which allow patterns ``resolve_source`` asks for; the offline replica (tests/experiments/
test_evaluate_real_layout.py) checks that a ``.bin`` beside safetensors is never opened.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import huggingface_hub
import pytest

from massmerge import sources
from massmerge.sources import SourceNotAvailable, model_patterns, resolve_source

#: the two kinds of openai base repo (main): L/14 holds model.safetensors and pytorch_model.bin (1.71 GB each),
#: B/32 and B/16 pytorch_model.bin only; both also hold TF and Flax weights
L14_FILES = [".gitattributes", "README.md", "config.json", "flax_model.msgpack", "merges.txt", "model.safetensors",
             "preprocessor_config.json", "pytorch_model.bin", "special_tokens_map.json", "tf_model.h5",
             "tokenizer.json", "tokenizer_config.json", "vocab.json"]
B32_FILES = [f for f in L14_FILES if f != "model.safetensors"]


def _fetched(files: list[str], patterns: tuple[str, ...]) -> set[str]:
    return {f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)}


def test_both_formats_fetch_safetensors_only() -> None:
    fetched = _fetched(L14_FILES, model_patterns(L14_FILES))
    assert "model.safetensors" in fetched
    assert not fetched & {"pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"}
    assert {"config.json", "preprocessor_config.json", "tokenizer.json", "vocab.json", "merges.txt"} <= fetched


def test_pickle_only_repo_fetches_its_pickle() -> None:
    fetched = _fetched(B32_FILES, model_patterns(B32_FILES))
    assert "pytorch_model.bin" in fetched and not fetched & {"tf_model.h5", "flax_model.msgpack"}


@pytest.mark.parametrize(("files", "weights"), [(L14_FILES, "model.safetensors"), (B32_FILES, "pytorch_model.bin")])
def test_resolve_source_asks_for_one_format(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, files: list[str],
                                            weights: str) -> None:
    calls: list[dict] = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kw: list(files))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: calls.append({"repo_id": repo_id, **kw}) or str(tmp_path))
    sources.list_repo_files.cache_clear()
    assert resolve_source(f"openai/clip-{len(files)}") == tmp_path
    patterns = tuple(calls[0]["allow_patterns"])
    assert _fetched(files, patterns) & {"model.safetensors", "pytorch_model.bin"} == {weights}


def test_explicit_patterns_are_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Callers with their own patterns (datasets, a single file) are not second-guessed and list nothing."""
    calls: list[dict] = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda *a, **k: pytest.fail("listed"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append(kw) or str(tmp_path))
    resolve_source("org/name", allow_patterns=("config.json",))
    assert calls[0]["allow_patterns"] == ["config.json"]


def test_a_failed_listing_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> list[str]:
        raise OSError("connection refused\nmore")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", refuse)
    sources.list_repo_files.cache_clear()
    with pytest.raises(SourceNotAvailable, match="org/gone: cannot download") as info:
        resolve_source("org/gone")
    assert "\n" not in str(info.value) and "--local-dir" in str(info.value)
