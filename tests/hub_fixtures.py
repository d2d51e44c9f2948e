"""A local HF hub cache made by the tests: what `hf download` would leave, so hub ids resolve offline.

Layout (huggingface_hub's): ``HF_HOME/hub/{models|datasets}--ORG--NAME/refs/main`` holds a commit id and
``snapshots/<commit>/`` the repo's files. With ``HF_HUB_OFFLINE=1`` ``snapshot_download`` returns that folder.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def cache_repo(hf_home: Path, repo_id: str, files: Path, repo_type: str = "model") -> Path:
    """Copy the directory ``files`` into the cache as ``repo_id``'s main revision; returns the snapshot folder."""
    kind = {"model": "models", "dataset": "datasets"}[repo_type]
    root = hf_home / "hub" / f"{kind}--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    shutil.copytree(files, snapshot, dirs_exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot
