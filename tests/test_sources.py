"""The one download path: local paths win, hub ids honour HF_HUB_OFFLINE and fail with a how-to line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from massmerge.errors import MassMergeError
from massmerge.sources import SourceNotAvailable, is_offline, parse_hub_id, resolve_source

SRC = Path(__file__).resolve().parents[1] / "src" / "massmerge"


def test_local_path_is_returned_as_is(tmp_path: Path) -> None:
    assert resolve_source(tmp_path) == tmp_path
    shadow = tmp_path / "org" / "name"
    shadow.mkdir(parents=True)
    assert resolve_source(str(shadow)) == shadow


def test_parse_hub_ids() -> None:
    assert parse_hub_id("openai/clip-vit-base-patch32") == ("openai/clip-vit-base-patch32", None)
    assert parse_hub_id("hf-hub:laion/CLIP-ViT-B-32@v1.0") == ("laion/CLIP-ViT-B-32", "v1.0")
    assert parse_hub_id("hf://tanganke/clip-vit-base-patch32_sun397") == ("tanganke/clip-vit-base-patch32_sun397", None)
    assert parse_hub_id("./relative/dir/x") is None
    assert parse_hub_id("model.safetensors") is None


def test_offline_hub_id_fails_with_how_to_fetch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert is_offline()
    with pytest.raises(SourceNotAvailable) as info:
        resolve_source("tanganke/clip-vit-base-patch32_sun397", revision="main")
    message = str(info.value)
    assert "\n" not in message
    assert "HF_HUB_OFFLINE" in message
    assert "download tanganke/clip-vit-base-patch32_sun397 --revision main" in message
    assert "--local-dir" in message and "pass its path" in message


def test_unreachable_hub_fails_fast_and_clearly(tmp_path: Path) -> None:
    """Not offline, but no network: the same one-line advice (run in a subprocess so the endpoint applies)."""
    code = (
        "from massmerge.sources import resolve_source\n"
        "try:\n    resolve_source('org/does-not-exist')\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "PYTHONPATH": str(SRC.parent)},
                         timeout=120)
    assert out.stdout.startswith("SourceNotAvailable org/does-not-exist: cannot download"), out.stdout + out.stderr
    assert "--local-dir" in out.stdout


def test_not_a_path_nor_a_hub_id() -> None:
    with pytest.raises(MassMergeError, match="no such file or directory"):
        resolve_source("/definitely/missing/model.safetensors")
    with pytest.raises(MassMergeError, match="conflicts"):
        resolve_source("org/name@v1", revision="v2")


def test_no_other_module_downloads() -> None:
    """Every download goes through sources.py: no other module calls the hub's download functions."""
    pattern = re.compile(r"snapshot_download|hf_hub_download|load_dataset\(|urlopen|requests\.get")
    offenders = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
                 if p.name != "sources.py" and pattern.search(p.read_text())]
    allowed = {"data/images.py"}  # HF datasets are loaded there, after resolve_source(repo_type='dataset')
    assert set(offenders) <= allowed, offenders


def test_importing_the_adapters_downloads_nothing() -> None:
    """Importing the adapter modules pulls in neither huggingface_hub nor transformers (so nothing can download)."""
    code = (
        "import sys, massmerge.sources, massmerge.adapters, massmerge.heads.zoo\n"
        "print(sorted(m for m in ('huggingface_hub', 'transformers', 'datasets') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(SRC.parent), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
