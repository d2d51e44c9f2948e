"""Read, validate and write state dicts.

Checkpoints come from strangers, so reading is safetensors-only by default (pickle can run code) and every
problem is reported as a :class:`CheckpointError` naming the file and the key. Experts are opened lazily
(:func:`open_checkpoint`) so a merge holds one expert tensor at a time, never T whole checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from massmerge.errors import CheckpointError
from massmerge.io.atomic import WriteError, atomic_write, short_reason, write_directory_atomically
from massmerge.io.tensors import canonicalize_metadata_order

StateDict = dict[str, torch.Tensor]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HF_SINGLE_FILE = "model.safetensors"
HF_SHARD_INDEX = "model.safetensors.index.json"
HF_PICKLE_FILE = "pytorch_model.bin"
CONVERTED_ENV = "MASSMERGE_CONVERTED_DIR"  # where converted pickles go; default ~/.cache/massmerge/safetensors


class LazyCheckpoint(Mapping[str, torch.Tensor]):
    """A read-only mapping over one or more safetensors files that reads a tensor only when indexed.

    Why: merging T experts must not hold T full checkpoints in memory; with this mapping a merge reads one
    tensor of one expert at a time. Shapes and dtypes are known without reading any tensor data.

    Files are memory-mapped (copy-on-write, never written) and every read hands its pages back to the OS when
    it is done (``madvise(MADV_DONTNEED)``): the kernel keeps the file in its page cache, but this process's
    resident memory does not grow with every expert it has read. (safetensors' own handles keep each touched
    page mapped until the handle is closed, so a key-by-key merge over T open experts grew by T checkpoints.)
    """

    def __init__(self, source: Path, key_to_file: dict[str, Path]) -> None:
        self.source = source
        self._key_to_file = key_to_file
        self._meta: dict[str, _TensorEntry] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        for file in sorted(set(key_to_file.values())):
            for key, entry in _header_entries(file).items():
                if key_to_file.get(key) == file:
                    self._meta[key] = entry

    def __getitem__(self, key: str) -> torch.Tensor:
        """A fresh copy of the tensor (the caller owns it and may change it)."""
        with self.borrow(key) as view:
            return view.clone()

    @contextmanager
    def borrow(self, key: str) -> Iterator[torch.Tensor]:
        """A zero-copy, read-only view of ``key`` valid inside the ``with`` block; its pages are released after.

        Why: a merge that only reads a tensor once (``expert - base``) need not copy it first.
        """
        if key not in self._key_to_file:
            raise KeyError(key)
        entry = self._meta[key]
        mapped = self._map(self._key_to_file[key], entry)
        try:
            yield entry.view(mapped)
        finally:
            _release(mapped, entry.start, entry.end)

    def _map(self, file: Path, entry: "_TensorEntry") -> mmap.mmap:
        if file not in self._maps:
            try:
                with open(file, "rb") as handle:
                    self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{file}: not a readable safetensors file ({short_reason(exc)})") from None
        mapped = self._maps[file]
        if mapped.size() < entry.end:
            raise CheckpointError(f"{file}: cannot read tensor '{entry.key}' (the file is shorter than its header "
                                  "says; was it truncated after opening?)")
        return mapped

    def __iter__(self) -> Iterator[str]:
        return iter(self._key_to_file)

    def __contains__(self, key: object) -> bool:
        """Membership from the header (``Mapping.__contains__`` would read and copy the tensor)."""
        return key in self._key_to_file

    def __len__(self) -> int:
        return len(self._key_to_file)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` without reading its data."""
        return self._meta[key].shape

    def dtype_name(self, key: str) -> str:
        """safetensors dtype name (e.g. 'F32', 'BF16') of ``key`` without reading its data."""
        return self._meta[key].dtype_name


@dataclass(frozen=True)
class _TensorEntry:
    """Where one tensor lies in its (already validated) safetensors file: absolute byte range, dtype, shape."""

    key: str
    dtype_name: str
    shape: tuple[int, ...]
    start: int
    end: int

    def view(self, mapped: mmap.mmap) -> torch.Tensor:
        dtype = _SAFETENSORS_DTYPES[self.dtype_name]
        count = math.prod(self.shape)
        if count == 0:
            return torch.empty(self.shape, dtype=dtype)
        with warnings.catch_warnings():  # the copy-on-write map is writable; torch warns on read-only buffers only
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=self.start)
        return flat.view(self.shape)


def _header_entries(file: Path) -> dict[str, _TensorEntry]:
    """Byte ranges of every tensor of a safetensors file whose header safetensors has already validated."""
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: key '{key}' has dtype {info['dtype']}, which massmerge cannot read")
        start, end = info["data_offsets"]
        entries[key] = _TensorEntry(key, info["dtype"], tuple(info["shape"]), 8 + size + start, 8 + size + end)
    return entries


def _release(mapped: mmap.mmap, start: int, end: int) -> None:
    """Drop this process's pages of ``[start, end)`` (unmodified copy-on-write pages refault from the file)."""
    if not hasattr(mapped, "madvise") or end <= start:
        return
    first = start - start % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, first, end - first)


def _safetensors_files(path: Path) -> dict[str, Path]:
    """Map every key to the safetensors file holding it, for a file or an HF model directory."""
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise pickle_refusal(path)
        return _keys_of_file(path)
    if path.is_dir():
        index = path / HF_SHARD_INDEX
        if index.is_file():
            return _keys_of_index(index)
        single = path / HF_SINGLE_FILE
        if single.is_file():
            return _keys_of_file(single)
        raise CheckpointError(
            f"{path}: not an HF model directory (no {HF_SINGLE_FILE} or {HF_SHARD_INDEX} inside)"
        )
    raise CheckpointError(f"{path}: no such file or directory")


def _keys_of_file(file: Path) -> dict[str, Path]:
    if file.stat().st_size == 0:
        raise CheckpointError(f"{file}: empty file, not a safetensors checkpoint")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({short_reason(exc)})") from None
    if not keys:
        raise CheckpointError(f"{file}: safetensors file holds no tensors")
    return {key: file for key in keys}


def _keys_of_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: malformed shard index ({short_reason(exc)})") from None
    key_to_file: dict[str, Path] = {}
    for shard in sorted(set(weight_map.values())):
        shard_keys = _keys_of_file(index.parent / shard) if (index.parent / shard).is_file() else None
        if shard_keys is None:
            raise CheckpointError(f"{index}: shard '{shard}' is missing")
        key_to_file.update(shard_keys)
    missing = sorted(set(weight_map) - set(key_to_file))
    if missing:
        raise CheckpointError(f"{index}: key '{missing[0]}' is listed in the index but absent from its shard")
    return key_to_file


def largest_shard_bytes(path: str | os.PathLike[str]) -> int | None:
    """The tensor bytes of the largest shard of a sharded HF model directory (its index names the shards), or
    None for a single file or a directory with one ``model.safetensors``: the limit an artifact splits this
    base with again, so that a base that came sharded stays sharded (shards of the same size at most)."""
    path = Path(path)
    index = path / HF_SHARD_INDEX
    if not path.is_dir() or not index.is_file():
        return None
    shards = sorted(set(_keys_of_index(index).values()))
    return max(sum(entry.end - entry.start for entry in _header_entries(shard).values()) for shard in shards)


def open_checkpoint(path: str | os.PathLike[str]) -> LazyCheckpoint:
    """Open a safetensors file or HF model directory lazily (no tensor is read yet)."""
    path = Path(path)
    return LazyCheckpoint(path, _safetensors_files(path))


def load_state_dict(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> StateDict:
    """Load a whole state dict into memory.

    Safetensors files and HF model directories (single or sharded) are read directly. Pickle files (``.bin``,
    ``.pt``...) are refused unless ``trust_pickle``; even then ``torch.load(weights_only=True)`` is used.
    """
    path = Path(path)
    if trust_pickle and is_pickle_source(path):
        return _load_pickle(path)
    lazy = open_checkpoint(path)
    return {key: lazy[key] for key in lazy}


def is_pickle_source(path: Path) -> bool:
    """Whether ``path`` is a pickle checkpoint (a pickle file, or an HF directory with only pytorch_model.bin)."""
    if path.is_file():
        return path.suffix in PICKLE_SUFFIXES
    return path.is_dir() and not (path / HF_SINGLE_FILE).exists() and (path / HF_PICKLE_FILE).is_file()


def pickle_refusal(file: Path) -> CheckpointError:
    """The one-line refusal of a pickle file nobody opted in to: names the file and every way to opt in."""
    return CheckpointError(
        f"{file}: pickle checkpoints can run arbitrary code and are refused; if you trust its author pass "
        "--trust-pickle (evaluate config: trust_pickle: true, or a list naming this source; Python: "
        "trust_pickle=True), or convert it to safetensors"
    )


def _load_pickle(path: Path, *, mapped: bool = False) -> StateDict:
    file = path / HF_PICKLE_FILE if path.is_dir() else path
    try:
        obj = _torch_load(file, mapped=mapped)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise CheckpointError(f"{file}: cannot load as a weights-only torch file ({short_reason(exc)})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{file}: does not hold a flat state dict of tensors")
    return dict(obj)


def _torch_load(file: Path, *, mapped: bool) -> object:
    """``torch.load`` weights-only; ``mapped`` maps a zip-format file's tensors instead of reading them (a legacy
    non-zip file cannot be mapped and is read)."""
    if mapped:
        try:
            return torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                raise
    return torch.load(str(file), map_location="cpu", weights_only=True)


# ----- a pickle-only HF directory, converted once ----------------------------------------------------------------

def converted_cache() -> Path:
    """Where converted pickle directories live: ``$MASSMERGE_CONVERTED_DIR``, else ~/.cache/massmerge/safetensors."""
    override = os.environ.get(CONVERTED_ENV, "").strip()
    return Path(override).expanduser() if override else Path.home() / ".cache" / "massmerge" / "safetensors"


def safetensors_model_dir(path: Path, *, trust_pickle: bool, cache: Path | None = None) -> Path:
    """``path`` itself unless it is an HF directory whose only weights are ``pytorch_model.bin``; then, when the
    user trusts pickle, a copy of the directory with the weights as ``model.safetensors``, converted once and kept
    in ``cache`` (:func:`converted_cache`) under the pickle's sha256 and size; a refusal naming the file otherwise.

    Why convert rather than read the pickle on every load: the OpenAI CLIP bases (B/32, B/16) hold only
    ``pytorch_model.bin``, and a run reads the base several times (vision tower, projection, text tower).
    Converting unpickles it exactly once, here, with ``torch.load(weights_only=True)``; everything after (our
    lazy reader, transformers) sees safetensors only and never runs its own unpickler (docs/real_checkpoints.md).
    """
    if not (path.is_dir() and is_pickle_source(path)):
        return path
    file = path / HF_PICKLE_FILE
    if not trust_pickle:
        raise pickle_refusal(file)
    digest = _file_digest(file)
    sides = _side_files(path)
    key = hashlib.sha256(json.dumps([digest, file.stat().st_size, [(p.name, _file_digest(p)) for p in sides]])
                         .encode()).hexdigest()[:32]
    target = (cache or converted_cache()) / key
    if (target / HF_SINGLE_FILE).is_file():
        return target
    write_directory_atomically(target, lambda tmp: _convert_into(tmp, file, sides, digest),
                               what=f"the safetensors copy of {file}")
    return target


def _side_files(path: Path) -> list[Path]:
    """The directory's files other than weights (configs, tokenizer and processor files) that a copy needs."""
    weights = (".safetensors", ".msgpack", ".h5", *PICKLE_SUFFIXES)
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.endswith(weights) and not p.name.startswith("."))


def _file_digest(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _convert_into(folder: Path, file: Path, sides: list[Path], digest: str) -> None:
    """Fill ``folder``: the side files copied, the pickle's tensors as ``model.safetensors`` (weights-only load,
    memory-mapped; tensors that share storage are copied apart, as safetensors requires)."""
    folder.mkdir(parents=True, exist_ok=True)
    for side in sides:
        shutil.copyfile(side, folder / side.name)
    state = _load_pickle(file, mapped=True)
    seen: set[int] = set()
    tensors = {}
    for key, value in state.items():
        storage = value.untyped_storage()
        shared = storage.data_ptr() in seen or storage.nbytes() != value.numel() * value.element_size()
        seen.add(storage.data_ptr())
        tensors[key] = value.detach().contiguous().clone() if shared else value.detach().contiguous()
    try:
        save_file(tensors, str(folder / HF_SINGLE_FILE), metadata={"format": "pt", "converted_from": file.name,
                                                                    "sha256": digest})
    except SafetensorError as exc:
        raise WriteError.of(folder / HF_SINGLE_FILE, exc) from None


def validate_compatible(base: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], *, name: str) -> None:
    """Check that ``other`` has exactly the base's keys, shapes and dtypes; the error names file and key."""
    other_keys = set(iter(other))  # keys only: ``in`` on a lazy Mapping may read the tensor
    missing = [k for k in base if k not in other_keys]
    if missing:
        raise CheckpointError(f"{name}: key '{missing[0]}' of the base is missing ({len(missing)} missing)")
    extra = [k for k in other if k not in base]
    if extra:
        raise CheckpointError(f"{name}: key '{extra[0]}' is not in the base ({len(extra)} extra)")
    for key in base:
        base_shape, other_shape = _shape(base, key), _shape(other, key)
        if base_shape != other_shape:
            raise CheckpointError(
                f"{name}: key '{key}' has shape {list(other_shape)}, the base has {list(base_shape)}"
            )
        base_dtype, other_dtype = _dtype(base, key), _dtype(other, key)
        if base_dtype != other_dtype:
            raise CheckpointError(f"{name}: key '{key}' has dtype {other_dtype}, the base has {base_dtype}")


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if isinstance(state, LazyCheckpoint):
        return state.shape(key)
    return tuple(state[key].shape)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _dtype(state: Mapping[str, torch.Tensor], key: str) -> torch.dtype | str:
    if isinstance(state, LazyCheckpoint):
        name = state.dtype_name(key)
        return _SAFETENSORS_DTYPES.get(name, name)
    return state[key].dtype


def all_finite(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` holds no NaN or Inf (always for non-floating tensors).

    Why the sum first: a NaN or Inf anywhere makes the sum non-finite, and a sum costs a few percent of
    ``isfinite(t).all()`` (measured: 6 ms against 170 ms for 22.7M float32 values on 2 cores). Only a
    non-finite sum, i.e. a bad value or an overflow of finite ones, pays for the exact check.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    total = tensor.sum(dtype=torch.float32) if tensor.element_size() < 4 else tensor.sum()
    return math.isfinite(float(total)) or bool(torch.isfinite(tensor).all())


def check_finite(state: Mapping[str, torch.Tensor], *, name: str) -> None:
    """Refuse NaN or Inf in any floating tensor; reads lazily one tensor at a time."""
    for key in state:
        tensor = state[key]
        if not all_finite(tensor):
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise CheckpointError(f"{name}: key '{key}' contains {kind} values")


def save_state_dict(
    state: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically: a temp file in the same directory, fsync, then rename.

    A failure (disk full, interrupt) leaves no partial file and any previous file at ``path`` untouched.
    """
    path = Path(path)
    tensors = {key: value.detach().contiguous().cpu() for key, value in state.items()}

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:  # a full disk surfaces as SafetensorError, not OSError
            raise WriteError.of(path, exc) from None
        canonicalize_metadata_order(tmp)

    atomic_write(path, write)
