"""Whose weights may be read, and under which names: the trust rules and key alignment of every adapter.

Checkpoints and model directories come from strangers. Safetensors are read lazily by default; pickle files only
when the user trusts them (``--trust-pickle``, then weights-only); an HF directory whose config asks for custom
code (``auto_map``) is refused before transformers reads it; JSON configs are bounded. A checkpoint is then
viewed under the names of the one model that runs inference (:class:`AlignedCheckpoint`), whatever prefix its
author saved it with.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from massmerge.checkpoints import PICKLE_SUFFIXES, load_state_dict, open_checkpoint, pickle_refusal
from massmerge.errors import CheckpointError
from massmerge.io.jsonfile import read_json_file


def open_weights(path: Path, *, trust_pickle: bool = False) -> Mapping[str, torch.Tensor]:
    """Open safetensors lazily (file or HF directory); fall back to a pickle file only when trusted."""
    check_pickle_policy(path, trust_pickle=trust_pickle)
    if path.is_dir() and not any(path.glob("*.safetensors")):
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            return load_state_dict(pickles[0], trust_pickle=True)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES and trust_pickle:
        return load_state_dict(path, trust_pickle=True)
    return open_checkpoint(path)


def check_pickle_policy(path: Path, *, trust_pickle: bool) -> None:
    """Refuse an HF directory whose only weights are pickle files, unless the user trusts them."""
    if path.is_dir() and not any(path.glob("*.safetensors")) and not trust_pickle:
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise pickle_refusal(pickles[0])


def read_json_config(path: Path) -> Any:
    """A JSON config file of a user's or a stranger's directory: bounded size and nesting, UTF-8, one-line errors."""
    return read_json_file(path, "a config file", CheckpointError)


CODE_CONFIGS = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def refuse_remote_code(directory: Path) -> None:
    """Refuse an HF directory whose config asks for custom modelling, tokenizer or processor code.

    Why refuse rather than ignore: transformers would quietly build its own class for a known ``model_type``
    (so the model is not the one its author meant) or ask to run the directory's ``.py`` files. massmerge never
    passes ``trust_remote_code``, so such a directory is named in one line instead (README, "What is trusted").
    """
    if not directory.is_dir():
        return
    for name in CODE_CONFIGS:
        path = directory / name
        if not path.is_file():
            continue
        config = read_json_config(path)
        if isinstance(config, dict) and "auto_map" in config:
            raise CheckpointError(f"{path}: field 'auto_map' asks for custom code, which massmerge never runs "
                                  "(no trust_remote_code); use a model whose architecture transformers ships")


class AlignedCheckpoint(Mapping[str, torch.Tensor]):
    """A lazy view of a checkpoint under the *model's* parameter names.

    Why: the same weights are saved as ``vision_model.encoder...`` (CLIP, transformers 4), ``encoder...``
    (transformers 5), ``bert.encoder...`` (a classifier checkpoint) or ``visual.transformer...`` (open_clip
    whole model). MASS compares experts key by key, so every checkpoint is viewed under the names of the one
    model that runs inference; keys outside it (a text tower, a classifier) are left out and listed in
    ``dropped``.
    """

    def __init__(self, source: Mapping[str, torch.Tensor], model_keys: list[str], *, name: str) -> None:
        self.source = source
        self.name = name
        self._map = align_keys(list(source.keys()), model_keys, name=name)
        used = set(self._map.values())
        self.dropped = [k for k in source.keys() if k not in used]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.source[self._map[key]]

    def borrow(self, key: str) -> AbstractContextManager[torch.Tensor]:
        """A read-only view of ``key`` for the duration of a ``with`` block: zero-copy when the source is a
        :class:`~massmerge.checkpoints.LazyCheckpoint` (so a merge reads each expert tensor once, no copy)."""
        borrow = getattr(self.source, "borrow", None)
        return borrow(self._map[key]) if callable(borrow) else nullcontext(self.source[self._map[key]])

    def __contains__(self, key: object) -> bool:
        return key in self._map  # without reading the tensor (Mapping.__contains__ would)

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def shape(self, key: str) -> tuple[int, ...] | None:
        """Shape of ``key`` from the file's header when the source can tell without reading (else None)."""
        shape_of = getattr(self.source, "shape", None)
        return tuple(shape_of(self._map[key])) if callable(shape_of) else None


def align_keys(file_keys: list[str], model_keys: list[str], *, name: str) -> dict[str, str]:
    """Map each model key to a file key under one consistent prefix rewrite (strip or add a dotted prefix).

    The rewrite that covers the most model keys wins; every model key must then be found, else a
    CheckpointError names the first missing one.
    """
    files = set(file_keys)
    best: dict[str, str] = {}
    for strip, add in _candidate_rewrites(file_keys, model_keys):
        mapping = {}
        for key in model_keys:
            candidate = strip + key[len(add):] if key.startswith(add) else None
            if candidate is not None and candidate in files:
                mapping[key] = candidate
        if len(mapping) > len(best):
            best = mapping
    missing = [k for k in model_keys if k not in best]
    if missing:
        raise CheckpointError(
            f"{name}: key '{missing[0]}' of the model is not in the checkpoint ({len(missing)} missing; "
            f"the checkpoint has e.g. '{file_keys[0] if file_keys else '-'}')"
        )
    return best


def _candidate_rewrites(file_keys: list[str], model_keys: list[str]) -> list[tuple[str, str]]:
    """(file prefix, model prefix) pairs worth trying: identity plus prefixes seen on one side only."""
    rewrites = {("", "")}
    probe_model = model_keys[: 64]
    file_set = set(file_keys)
    for key in probe_model:
        for fk in file_keys:
            if fk.endswith("." + key):
                rewrites.add((fk[: -len(key)], ""))
            elif key.endswith("." + fk):
                rewrites.add(("", key[: -len(fk)]))
        if len(rewrites) > 8 or key in file_set:
            break
    return sorted(rewrites, key=lambda r: (len(r[0]) + len(r[1]), r))



__all__ = ["AlignedCheckpoint", "CODE_CONFIGS", "align_keys", "check_pickle_policy", "open_weights", "read_json_config",
           "refuse_remote_code"]
