"""Turn a user's model reference into local files: the ONE place where massmerge may download.

Why one function: users run on clusters without internet and on laptops with it. Every download goes through
:func:`resolve_source`, which honours ``HF_HUB_OFFLINE`` and, when the files are not available locally, fails
with one line that says how to fetch them elsewhere and pass the local directory instead. Nothing here runs at
import time; ``huggingface_hub`` is imported only when a hub id must be resolved.

Accepted specs:
- a local path (file or directory), ``~`` expanded: returned as is;
- an HF hub id ``org/name``, optionally ``org/name@revision`` (or ``revision=``), optionally prefixed ``hf://``
  or ``hf-hub:`` (the open_clip spelling).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from massmerge.errors import MassMergeError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB_PREFIXES = ("hf://", "hf-hub:")
_TRUE = {"1", "true", "yes", "on"}

# Files a model snapshot needs: configs and tokenizer/processor files (CLIP zero-shot heads need them) and the
# weights in ONE format (:func:`model_patterns`): safetensors where the repo has them, else its pickle files
# (read only under --trust-pickle). TF and Flax weights are never fetched.
MODEL_FILES = ("*.json", "*.txt", "*.model", "tokenizer*", "vocab*", "merges*")
SAFETENSORS_FILES = ("*.safetensors",)
PICKLE_FILES = ("*.bin", "*.pt")
DEFAULT_PATTERNS = (*MODEL_FILES, *SAFETENSORS_FILES, *PICKLE_FILES)


class SourceNotAvailable(MassMergeError):
    """A hub id cannot be resolved (offline, no network, unknown repo); the message says how to fix it."""


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network access."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """Split ``[hf://|hf-hub:]org/name[@revision]`` into (repo_id, revision); None if ``spec`` is not a hub id."""
    text = spec
    for prefix in _HUB_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    repo, _, revision = text.partition("@")
    if not _HUB_ID.match(repo):
        return None
    return repo, (revision or None)


def resolve_source(
    spec: str | os.PathLike[str],
    revision: str | None = None,
    *,
    allow_patterns: tuple[str, ...] | None = DEFAULT_PATTERNS,
    repo_type: str = "model",
) -> Path:
    """Return a local path for ``spec``: an existing path as is, or a hub snapshot directory.

    A string that is both an existing path and looks like ``org/name`` is treated as the local path: local
    files always win, so an offline user can shadow a hub id with a directory of the same name.
    Raises :class:`SourceNotAvailable` with a one-line fix when a hub id cannot be resolved.
    """
    path = Path(os.path.expanduser(os.fspath(spec)))
    if path.exists():
        return path
    text = os.fspath(spec)
    parsed = parse_hub_id(text)
    if parsed is None:
        raise MassMergeError(f"{text}: no such file or directory, and not an HF hub id of the form org/name")
    repo_id, spec_revision = parsed
    if revision and spec_revision and revision != spec_revision:
        raise MassMergeError(f"{text}: revision '{spec_revision}' in the id conflicts with revision='{revision}'")
    revision = revision or spec_revision
    if repo_type == "model" and allow_patterns == DEFAULT_PATTERNS and not is_offline():
        allow_patterns = model_patterns(list_repo_files(repo_id, revision))
    return _snapshot(repo_id, revision, allow_patterns, repo_type)


def model_patterns(files: Sequence[str]) -> tuple[str, ...]:
    """What to fetch of a model repo holding ``files``: its configs and tokenizer files, and its weights in one
    format, safetensors when it has any, else pickle (openai/clip-vit-large-patch14 holds a 1.7 GB
    ``pytorch_model.bin`` beside a 1.7 GB ``model.safetensors``: only the latter is fetched).
    Offline the snapshot holds what it holds; the loaders then prefer safetensors the same way."""
    has_safetensors = any(name.endswith(".safetensors") for name in files)
    return (*MODEL_FILES, *(SAFETENSORS_FILES if has_safetensors else PICKLE_FILES))


@lru_cache(maxsize=256)
def list_repo_files(repo_id: str, revision: str | None, repo_type: str = "model") -> tuple[str, ...]:
    """The file names of a hub repo at ``revision`` (one API call per process; no file is downloaded)."""
    try:
        from huggingface_hub import list_repo_files as listing

        return tuple(listing(repo_id, revision=revision, repo_type=repo_type))
    except Exception as exc:  # noqa: BLE001 - network, auth and 404 all need the same advice
        raise SourceNotAvailable(f"{repo_id}: cannot download (listing its files: {_reason(exc)}); "
                                 f"{how_to_fetch(repo_id, revision, repo_type)}") from None


def how_to_fetch(repo_id: str, revision: str | None, repo_type: str = "model") -> str:
    """The one-line instruction for getting ``repo_id`` onto a machine without network access."""
    rev = f" --revision {revision}" if revision else ""
    kind = f" --repo-type {repo_type}" if repo_type != "model" else ""
    local = repo_id.replace("/", "__")
    return (
        f"on a machine with internet run `hf download {repo_id}{rev}{kind} --local-dir {local}` "
        "(older huggingface_hub: `huggingface-cli download`), "
        f"copy {local}/ here and pass its path instead of '{repo_id}'"
    )


def _snapshot(repo_id: str, revision: str | None, allow_patterns: tuple[str, ...] | None, repo_type: str) -> Path:
    """Download (or find in the HF cache) one repo snapshot; every failure becomes a one-line SourceNotAvailable."""
    offline = is_offline()
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a hard dependency
        raise SourceNotAvailable(
            f"{repo_id}: resolving hub ids needs `pip install huggingface_hub`; or {how_to_fetch(repo_id, revision, repo_type)}"
        ) from None
    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            repo_type=repo_type,
            allow_patterns=list(allow_patterns) if allow_patterns else None,
            local_files_only=offline,
        )
    except Exception as exc:  # noqa: BLE001 - network, auth, 404 and cache misses all need the same advice
        reason = "HF_HUB_OFFLINE is set and it is not in the local HF cache" if offline else _reason(exc)
        raise SourceNotAvailable(f"{repo_id}: cannot download ({reason}); {how_to_fetch(repo_id, revision, repo_type)}") from None
    return Path(local)


def list_dataset_files(spec: str, revision: str | None = None) -> list[str]:
    """Every file path of a hub dataset repo: the hub's file list, or offline (``HF_HUB_OFFLINE``) the files of
    its cached snapshot, which is all that can be read then. Used to fetch one split's files only."""
    parsed = parse_hub_id(spec)
    if parsed is None:
        raise MassMergeError(f"{spec}: not an HF hub id of the form org/name")
    repo_id, spec_revision = parsed
    revision = revision or spec_revision
    if is_offline():
        root = _snapshot(repo_id, revision, ("README.md",), "dataset")
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    try:
        from huggingface_hub import HfApi

        return sorted(HfApi().list_repo_files(repo_id, repo_type="dataset", revision=revision))
    except Exception as exc:  # noqa: BLE001 - network, auth and 404 need the same advice
        raise SourceNotAvailable(f"{repo_id}: cannot list the dataset's files ({_reason(exc)}); "
                                 f"{how_to_fetch(repo_id, revision, 'dataset')}") from None


def _reason(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
