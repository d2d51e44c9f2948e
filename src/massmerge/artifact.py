"""A deployable MASS model on disk: safetensors tensors plus a JSON manifest, saved once and served.

Layout of an artifact directory (format 2)::

    manifest.json            format_version, tasks, build and serve settings, ranks, heads, base, every file
    factors.safetensors      factors/{task}/{key}/U|s|V per matrix, non_matrix/{task}/{key} per other key
    heads.safetensors        heads/{task}/weight (+ heads/{task}/bias)
    model/                   an HF model directory (config.json, model.safetensors, tokenizer files) when the
                             architecture comes from an adapter, so ``load`` can rebuild the module by itself
    base.safetensors         the base's tensors for a generic ``nn.Module`` (``load(dir, base_model=...)``)

The base may instead be a *reference*: an explicit outside safetensors file named in the manifest with its size
and sha256, verified before it is read.

The manifest separates ``build`` settings (fixed: rank fraction and scale, eps, SVD, factor dtype) from
``serve`` settings (defaults that ``load(dir, eta=...)`` and ``massmerge predict --eta ...`` override without a
rebuild, including the pooling and max length the experts were trained with). ``ranks`` is the one record of
every task's rank per matrix; factor shapes are checked against it and against the model's parameters.

The artifact is a trust boundary (an artifact may come from a stranger; it is data, never code):
every file ``load`` reads is a plain relative name inside the directory (no absolute path, no ``..``, no
symlink), listed in the manifest with its size and sha256, and checked before it is opened; a file in the
directory that the manifest does not list is refused; an HF ``config.json`` asking for custom code
(``auto_map``) is refused; every tensor is checked for shape and finite values before the first forward. Each
failure is one :class:`~massmerge.errors.MassMergeError` line naming the file and the field.

Why the factor dtype: a task keeps ``k (m + n + 1)`` numbers per matrix with ``k = min(m, n) / T``, so the T
tasks together store ``(1 + min/max)`` times each matrix: up to 2x for square matrices. By default factors are
stored in float16 for 32/64-bit bases (about 1.6-1.8x the base) and in the base's own dtype for 16-bit bases;
:func:`round_factors` applies the same rounding in memory, which is what ``massmerge build`` does, so a saved
artifact predicts bit-identically to the model that was built.

Writes are atomic (a temp directory next to the output, then renames); a stale temp directory left by a killed
build is removed by the next build to the same output.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from massmerge.checkpoints import WriteError, all_finite
from massmerge.errors import MassMergeError, OptionError
from massmerge.heads import LinearHead, ZeroShotHead
from massmerge.lowrank import LowRank
from massmerge.mass.config import BuildSettings, Pooling, ServeSettings
from massmerge.mass.experts import ExpertFactors
from massmerge.mass.model import MASSModel, Strategy, default_features
from massmerge.mass.pooling import PoolFn, identity_pool

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
FACTORS_FILE = "factors.safetensors"
HEADS_FILE = "heads.safetensors"
BASE_FILE = "base.safetensors"
MODEL_DIR = "model"
HF_WEIGHTS = "model.safetensors"
TOKENIZER_PATTERNS = ("tokenizer*", "vocab*", "merges*", "special_tokens_map.json", "*.model",
                      "preprocessor_config.json", "sentencepiece*", "added_tokens.json")
HASH_CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20
MAX_JSON_DEPTH = 32

DtypeName = Literal["float64", "float32", "float16", "bfloat16"]  # dtypes a manifest may name
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(DtypeName)}


# ----- manifest ---------------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class HeadEntry(_Strict):
    task: str
    kind: Literal["linear", "zero_shot"]
    num_classes: int = Field(ge=1)
    logit_scale: float | None = None
    class_names: list[str] | None = None


class BaseEntry(_Strict):
    """Where the base weights live: inside the artifact (``file``) or an explicit outside reference."""

    mode: Literal["embedded", "reference"]
    dtype: DtypeName
    file: str | None = None
    path: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    bytes: int | None = Field(default=None, ge=0)


class AdapterOptions(_Strict):
    """The adapter options an artifact may record (exactly what :func:`_architecture` writes): a closed set,
    so a hostile manifest cannot pass arbitrary keyword arguments to an adapter's constructor."""

    pooling: Pooling | None = None
    feature_pooling: Literal["mean", "cls", "pooler"] | None = None
    special_ids: list[Annotated[int, Field(ge=0)]] | None = None
    arch: str | None = None


class ArchitectureEntry(_Strict):
    """How to rebuild the module: an adapter family over ``model/``, or a user-supplied generic module."""

    kind: Literal["adapter", "module"]
    adapter: str | None = None
    options: AdapterOptions = AdapterOptions()
    pooling: Pooling | None = None


class Manifest(_Strict):
    format_version: int
    massmerge_version: str
    task_names: list[str] = Field(min_length=2)
    build: BuildSettings
    rank_fraction: float = Field(gt=0.0, le=1.0)
    rank_scale: float = Field(default=1.0, gt=0.0, le=1.0)
    serve: ServeSettings
    ranks: dict[str, list[int]]
    accepted: dict[str, list[int]]
    non_matrix_keys: list[str]
    factor_dtype: DtypeName
    base: BaseEntry
    architecture: ArchitectureEntry
    heads: list[HeadEntry]
    files: dict[str, FileEntry]

    @property
    def matrix_keys(self) -> list[str]:
        return list(self.ranks)


# ----- dtypes and rounding ------------------------------------------------------------------------------------

def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype, *, option: str = "--factor-dtype") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise OptionError(f"{option}: unknown dtype '{name}' (choose {', '.join(DTYPES)})")
    return DTYPES[name]


def storage_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Default factor storage: float16 for 32/64-bit bases, the base's own dtype for 16-bit ones."""
    return base_dtype if base_dtype in (torch.float16, torch.bfloat16) else torch.float16


def factor_storage(choice: str, base_dtype: torch.dtype) -> torch.dtype:
    """``--factor-dtype``: ``auto`` (see :func:`storage_dtype`) or an explicit dtype name."""
    return storage_dtype(base_dtype) if choice == "auto" else parse_dtype(choice)


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(t.dtype)


def round_factors(factors: ExpertFactors, dtype: torch.dtype, *, in_place: bool = False) -> ExpertFactors:
    """Factors rounded to ``dtype`` (storage) and back (compute): saving them in ``dtype`` is then lossless.

    Singular values stay in full precision (they are stored as float32 at least). ``in_place``: round the given
    tensors themselves and return ``factors`` (why: a second full copy of every factor was the peak of
    ``massmerge build``; in place, the peak is one tensor's storage-dtype copy).
    """
    if in_place:
        for per_task in factors.matrices.values():
            for f in per_task:
                f.U.copy_(f.U.to(dtype))
                f.V.copy_(f.V.to(dtype))
        for per_task in factors.non_matrix.values():
            for t in per_task:
                t.copy_(t.to(dtype))
        return factors
    matrices = {key: [LowRank(_round(f.U, dtype), f.s, _round(f.V, dtype)) for f in per_task]
                for key, per_task in factors.matrices.items()}
    non_matrix = {key: [_round(t, dtype) for t in per_task] for key, per_task in factors.non_matrix.items()}
    return ExpertFactors(task_names=list(factors.task_names), rank_fraction=factors.rank_fraction,
                         matrices=matrices, non_matrix=non_matrix, accepted=dict(factors.accepted), eps=factors.eps)


def to_storage(factors: ExpertFactors, dtype: torch.dtype) -> ExpertFactors:
    """``factors`` with U, V and the non-matrix deltas held in ``dtype`` (singular values as they are), converted
    one tensor at a time in place; returns ``factors``. For writing only: the factors no longer serve (MASS
    computes in the base's precision). Why: :func:`write_artifact` writes the storage dtype, and converting at
    write time held a second, storage-dtype copy of every factor beside the float32 ones (build's peak memory,
    issue 10); converted first, the float32 tensors are freed as their copies are made."""
    for per_task in factors.matrices.values():
        for t, f in enumerate(per_task):
            per_task[t] = LowRank(f.U.to(dtype).contiguous(), f.s, f.V.to(dtype).contiguous())
    for per_task in factors.non_matrix.values():
        for t, delta in enumerate(per_task):
            per_task[t] = delta.to(dtype).contiguous()
    return factors


def float_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the first floating-point tensor: the base's own precision."""
    for value in state.values():
        if value.is_floating_point():
            return value.dtype
    raise OptionError("base model: has no floating-point parameter")


# ----- hashing and atomic directories -------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Give a finished temp directory the modes a plain ``mkdir``/``open`` would (0755 / 0644 under umask 022):
    an artifact is meant to be served by another account, not kept private like a ``mkdtemp`` directory."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _temps_of(directory: Path) -> list[tuple[Path, str, int | None]]:
    """(path, "tmp" | "old", pid or None) of the temp directories a build to ``directory`` makes
    (``.NAME.<pid>.<random>.tmp|old``; ``.NAME.<random>.tmp`` from massmerge before 0.2, without a pid)."""
    pattern = re.compile(rf"\.{re.escape(directory.name)}\.(?:(\d+)\.)?[a-z0-9_]+\.(tmp|old)")
    found = []
    for path in sorted(directory.parent.glob(f".{glob.escape(directory.name)}.*")):
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink():
            found.append((path, match.group(2), int(match.group(1)) if match.group(1) else None))
    return found


def _alive(pid: int | None) -> bool:
    """Whether process ``pid`` still runs on this machine (None: a temp from before pids were recorded)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _remove_stale_temps(directory: Path) -> None:
    """Clean up after an earlier build to the same output that was killed (SIGKILL, power loss) mid-write.

    Its ``.tmp`` directory is removed once that process is gone (a concurrent build's is left alone). An
    ``.old`` directory still holding the previous artifact means the kill came between the two renames of the
    swap: that artifact is put back first when nothing has taken its place.
    """
    for path, kind, pid in _temps_of(directory):
        if _alive(pid):
            continue
        kept = path / "artifact"
        if kind == "old" and kept.is_dir() and not kept.is_symlink() and not os.path.lexists(directory):
            os.replace(kept, directory)
        shutil.rmtree(path, ignore_errors=True)


def _temp_dir(directory: Path, suffix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{directory.name}.{os.getpid()}.", suffix=suffix, dir=directory.parent))


def _is_write_failure(exc: BaseException, tmp: Path) -> bool:
    """Whether ``exc`` is a failed write into ``tmp`` (a full disk, a quota, a read-only file system), not a
    failed read of an input: safetensors reports these as ``SafetensorError``, Python as ``OSError``."""
    if isinstance(exc, SafetensorError):
        return True
    if isinstance(exc, OSError) and exc.errno is not None:
        name = str(exc.filename) if exc.filename is not None else None
        return name is None or Path(name) == tmp or tmp in Path(name).parents
    return False


def check_output_directory(directory: Path) -> None:
    """An output path may be new, an empty directory or an earlier artifact (replaced); anything else may be
    the user's data and is refused (``massmerge build`` checks this before its first SVD)."""
    directory = Path(directory)
    if directory.is_symlink() or (directory.exists() and (not directory.is_dir() or (
            any(directory.iterdir()) and not (directory / MANIFEST).is_file()))):
        raise OptionError(f"--output '{directory}' exists and is not a massmerge artifact; refusing to replace it")


def write_directory_atomically(directory: Path, fill: Callable[[Path], None]) -> None:
    """Run ``fill(tmp_dir)`` in a temp dir next to ``directory`` and swap it into place.

    A failure leaves no half-written ``directory``; an existing artifact there is replaced only once the new
    one is complete. A non-empty directory that is not an artifact is refused (it may be the user's data). A
    failed write (disk full) is one :class:`MassMergeError` naming ``directory``.
    """
    directory = Path(directory)
    check_output_directory(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(directory)
    tmp = _temp_dir(directory, ".tmp")
    old: Path | None = None
    try:
        try:
            fill(tmp)
            _apply_umask(tmp)
        except (OSError, SafetensorError) as exc:
            if not _is_write_failure(exc, tmp):
                raise
            raise WriteError.of(directory, exc, what="the artifact", tail="the previous contents are unchanged") \
                from None
        if directory.exists():
            old = _temp_dir(directory, ".old")
            os.replace(directory, old / "artifact")
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "artifact").exists() and not directory.exists():
            os.replace(old / "artifact", directory)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors without copying: only tensors that share storage with an earlier one are cloned."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        value = value.detach().cpu()
        ident = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
        out[key] = value.clone().contiguous() if ident in seen and value.numel() else value.contiguous()
        seen.add(ident)
    save_file(out, str(path), metadata=metadata)
    _fsync(path)


# ----- save ---------------------------------------------------------------------------------------------------

def factor_tensors(factors: ExpertFactors, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The factors as flat safetensors keys; U, V and non-matrix deltas in ``dtype``, s in float32 or wider."""
    s_dtype = torch.promote_types(dtype, torch.float32)
    out: dict[str, torch.Tensor] = {}
    for t, task in enumerate(factors.task_names):
        for key, per_task in factors.matrices.items():
            f = per_task[t]
            out[f"factors/{task}/{key}/U"] = f.U.to(dtype)
            out[f"factors/{task}/{key}/s"] = f.s.to(s_dtype)
            out[f"factors/{task}/{key}/V"] = f.V.to(dtype)
        for key, per_task in factors.non_matrix.items():
            out[f"non_matrix/{task}/{key}"] = per_task[t].to(dtype)
    return out


def head_entries(heads: Sequence[nn.Module], task_names: Sequence[str],
                 class_names: Sequence[Sequence[str] | None] | None) -> tuple[list[HeadEntry], dict[str, torch.Tensor]]:
    """Manifest entries and tensors of the heads (LinearHead or ZeroShotHead)."""
    entries, tensors = [], {}
    for t, (task, head) in enumerate(zip(task_names, heads, strict=True)):
        names = list(class_names[t]) if class_names and class_names[t] is not None else None
        if isinstance(head, ZeroShotHead):
            entries.append(HeadEntry(task=task, kind="zero_shot", num_classes=head.num_classes,
                                     logit_scale=head.logit_scale, class_names=names))
        elif isinstance(head, LinearHead):
            entries.append(HeadEntry(task=task, kind="linear", num_classes=head.num_classes, class_names=names))
            if head.bias is not None:
                tensors[f"heads/{task}/bias"] = head.bias
        else:
            raise OptionError(f"heads: task '{task}' has a {type(head).__name__}; only LinearHead/ZeroShotHead save")
        if names is not None and len(names) != head.num_classes:
            raise OptionError(f"heads: task '{task}' has {head.num_classes} classes but {len(names)} class names")
        tensors[f"heads/{task}/weight"] = head.weight
    return entries, tensors


def check_task_names(names: Sequence[str], source: str = "--task-names") -> None:
    """Task names are non-empty, unique and free of '/' (they are safetensors key parts); ``source`` says
    where they came from, for the error."""
    for name in names:
        if not name or "/" in name:
            raise OptionError(f"{source}: '{name}' is not a valid task name (non-empty, no '/')")
    duplicate = next((n for n in names if list(names).count(n) > 1), None)
    if duplicate is not None:
        raise OptionError(f"{source}: '{duplicate}' is given twice")


def save_artifact(model: MASSModel, directory: str | os.PathLike[str], **options: Any) -> Path:
    """Write ``model`` (with its serve settings as the artifact's defaults) as an artifact directory: its base,
    factors, heads and settings, by :func:`write_artifact` (which documents the options)."""
    return write_artifact(directory, base_model=model.model, factors=model.factors, heads=list(model.heads),
                          serve=model.settings, **options)


def write_artifact(
    directory: str | os.PathLike[str],
    *,
    base_model: nn.Module,
    factors: ExpertFactors,
    heads: Sequence[nn.Module],
    serve: ServeSettings,
    build: BuildSettings | None = None,
    adapter: Any | None = None,
    hf_config: Mapping[str, Any] | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    base_reference: str | os.PathLike[str] | None = None,
    factor_dtype: str | torch.dtype | None = None,
    class_names: Sequence[Sequence[str] | None] | None = None,
    rank_scale: float = 1.0,
) -> Path:
    """Write an artifact directory from a MASS model's parts (``massmerge build`` writes them without making
    the serving model, and with the factors already in their storage dtype, so that writing them makes no
    second copy: :func:`to_storage`).

    With ``adapter`` (a bound :class:`~massmerge.adapters.BaseAdapter`) and the model's HF config (taken from
    ``base_model.config`` when not given) the base is written as an HF model directory ``model/`` that
    :func:`load` rebuilds by itself; otherwise the base's tensors are stored (or referenced by
    ``base_reference``, a safetensors file holding exactly them) and ``load`` needs ``base_model=``.
    ``factor_dtype`` None picks :func:`storage_dtype` of the base. Writes are atomic.
    """
    directory = Path(directory)
    check_task_names(factors.task_names, "task_names")
    base_state = base_model.state_dict()
    base_dtype = float_dtype(base_state)
    store = parse_dtype(factor_dtype) if factor_dtype is not None else storage_dtype(base_dtype)
    entries, head_tensors = head_entries(list(heads), factors.task_names, class_names)
    architecture = _architecture(base_model, adapter, hf_config)
    if architecture.kind == "adapter" and base_reference is not None:
        raise OptionError("base_reference: only a generic module's base can be referenced, not an adapter's model")
    build = (build or BuildSettings()).model_copy(update={"eps": factors.eps, "factor_dtype": dtype_name(store)})

    def fill(tmp: Path) -> None:
        _save_tensors(factor_tensors(factors, store), tmp / FACTORS_FILE)
        _save_tensors(head_tensors, tmp / HEADS_FILE)
        base = _write_base(tmp, base_model, base_state, architecture, hf_config, tokenizer_dir, base_reference,
                           base_dtype)
        manifest = Manifest(
            format_version=FORMAT_VERSION, massmerge_version=_version(), task_names=list(factors.task_names),
            build=build, rank_fraction=factors.rank_fraction, rank_scale=rank_scale, serve=serve,
            ranks={key: [f.rank for f in per_task] for key, per_task in factors.matrices.items()},
            accepted=factors.accepted, non_matrix_keys=list(factors.non_matrix), factor_dtype=dtype_name(store),
            base=base, architecture=architecture, heads=entries, files=_file_entries(tmp),
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        _fsync(tmp / MANIFEST)

    write_directory_atomically(directory, fill)
    return directory


def _architecture(base_model: nn.Module, adapter: Any | None, hf_config: Mapping[str, Any] | None
                  ) -> ArchitectureEntry:
    if adapter is None:
        return ArchitectureEntry(kind="module")
    if hf_config is None and getattr(base_model, "config", None) is None:
        raise OptionError("adapter: the model has no HF config; pass hf_config=... or save it as a generic module")
    options: dict[str, Any] = {"pooling": adapter.pooling}
    for name in ("feature_pooling", "special_ids", "arch"):
        if getattr(adapter, name, None) is not None:
            value = getattr(adapter, name)
            options[name] = list(value) if isinstance(value, tuple) else value
    return ArchitectureEntry(kind="adapter", adapter=adapter.name, options=AdapterOptions(**options),
                             pooling=adapter.pooling)


def _write_base(tmp: Path, base_model: nn.Module, state: Mapping[str, torch.Tensor], architecture: ArchitectureEntry,
                hf_config: Mapping[str, Any] | None, tokenizer_dir: str | os.PathLike[str] | None,
                base_reference: str | os.PathLike[str] | None, base_dtype: torch.dtype) -> BaseEntry:
    dtype = dtype_name(base_dtype)
    if base_reference is not None:
        ref = Path(base_reference).resolve()
        _check_reference_matches(ref, state)
        return BaseEntry(mode="reference", dtype=dtype, path=str(ref), sha256=sha256_file(ref),
                         bytes=ref.stat().st_size)
    if architecture.kind == "module":
        _save_tensors(state, tmp / BASE_FILE)
        return BaseEntry(mode="embedded", dtype=dtype, file=BASE_FILE)
    model_dir = tmp / MODEL_DIR
    model_dir.mkdir()
    config = dict(hf_config) if hf_config is not None else base_model.config.to_dict()
    (model_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    _save_tensors(state, model_dir / HF_WEIGHTS, metadata={"format": "pt"})
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), model_dir)
    return BaseEntry(mode="embedded", dtype=dtype, file=f"{MODEL_DIR}/{HF_WEIGHTS}")


def _copy_tokenizer(source: Path, target: Path) -> None:
    """The base directory's tokenizer/processor files that an artifact may hold (:func:`model_file_allowed`)."""
    for file in sorted(source.iterdir()):
        if file.name not in ("config.json", HF_WEIGHTS) and model_file_allowed(file.name) and file.is_file() \
                and not file.is_symlink():
            shutil.copyfile(file, target / file.name)


def _check_reference_matches(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    tensors = _read_safetensors(path, "base_reference")
    for key, value in state.items():
        if key not in tensors or not torch.equal(tensors[key], value):
            raise OptionError(f"base_reference: '{path}' does not hold the model's tensor '{key}'")


def _file_entries(root: Path) -> dict[str, FileEntry]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {p.relative_to(root).as_posix(): FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size) for p in files}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("massmerge")
    except PackageNotFoundError:
        return "unknown"


# ----- heads files (the CLI's --heads format) ------------------------------------------------------------------

def write_head_file(path: str | os.PathLike[str], head: nn.Module, *, task: str | None = None,
                    class_names: Sequence[str] | None = None) -> None:
    """Write a head as the ``--heads`` file format: safetensors ``weight`` [C, d] (+ ``bias``) and metadata
    ``kind`` (zero_shot | linear), ``logit_scale`` (zero_shot), ``class_names`` (JSON list) and ``task``."""
    from massmerge.checkpoints import save_state_dict

    tensors = {"weight": head.weight}
    meta = {"kind": "zero_shot" if isinstance(head, ZeroShotHead) else "linear"}
    if isinstance(head, ZeroShotHead):
        meta["logit_scale"] = repr(head.logit_scale)
    elif getattr(head, "bias", None) is not None:
        tensors["bias"] = head.bias
    if class_names is not None:
        meta["class_names"] = json.dumps(list(class_names))
    if task is not None:
        meta["task"] = task
    save_state_dict(tensors, path, metadata=meta)


def read_head_file(path: str | os.PathLike[str]) -> tuple[nn.Module, str | None, list[str] | None]:
    """(head, task name or None, class names or None) from a ``--heads`` file; errors name the file and field.

    Checked before any expert is read: a float 2-D ``weight`` with at least one row and finite values, a bias
    of one value per class, a finite positive ``logit_scale`` for zero-shot heads (required: a silent default
    would make that head's logits incomparable with the others), class names matching the rows.
    """
    path = Path(path)
    if not path.is_file():
        raise MassMergeError(f"{path}: no such heads file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise MassMergeError(f"{path}: not a readable safetensors heads file ({str(exc).splitlines()[0][:200]})") from None
    weight = tensors.get("weight")
    if weight is None or weight.ndim != 2 or not weight.is_floating_point():
        raise MassMergeError(f"{path}: a heads file needs a floating 2-D tensor 'weight' [classes, dim]")
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise MassMergeError(f"{path}: 'weight' has shape {list(weight.shape)}; a head needs at least one class")
    if not bool(torch.isfinite(weight).all()):
        raise MassMergeError(f"{path}: 'weight' contains NaN or Inf values")
    kind = meta.get("kind", "linear")
    names = _class_names(meta, path, int(weight.shape[0]))
    if kind == "zero_shot":
        if "logit_scale" not in meta:
            raise MassMergeError(f"{path}: metadata logit_scale is missing (required for a zero_shot head)")
        head: nn.Module = ZeroShotHead(weight, _logit_scale(meta["logit_scale"], f"{path}: metadata logit_scale"))
    elif kind == "linear":
        bias = tensors.get("bias")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise MassMergeError(f"{path}: 'bias' has shape {list(bias.shape)}, expected [{weight.shape[0]}]")
        if bias is not None and not bool(torch.isfinite(bias).all()):
            raise MassMergeError(f"{path}: 'bias' contains NaN or Inf values")
        head = LinearHead(weight, bias)
    else:
        raise MassMergeError(f"{path}: metadata kind '{kind}' is not zero_shot or linear")
    return head, meta.get("task"), names


def _logit_scale(raw: Any, where: str) -> float:
    try:
        scale = float(raw)
    except (TypeError, ValueError):
        raise MassMergeError(f"{where} is not a number (got {raw!r})") from None
    if not math.isfinite(scale) or scale <= 0:
        raise MassMergeError(f"{where} must be a finite positive number (got {raw!r})")
    return scale


def _class_names(meta: Mapping[str, str], path: Path, classes: int) -> list[str] | None:
    if "class_names" not in meta:
        return None
    try:
        names = json.loads(meta["class_names"])
    except (ValueError, RecursionError):
        names = None
    if not isinstance(names, list) or len(names) != classes or not all(isinstance(n, str) for n in names):
        raise MassMergeError(f"{path}: metadata class_names must be a JSON list of {classes} strings")
    return names


# ----- load: confinement, checksums, structure ------------------------------------------------------------------

def parse_json_text(text: str, where: str) -> Any:
    """JSON with a bounded nesting depth (a hostile file must not reach the interpreter's recursion limit)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                raise MassMergeError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        elif char in "]}":
            depth -= 1
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MassMergeError(f"{where}: not valid JSON ({str(exc).splitlines()[0][:160]})") from None


def read_json_file(path: Path, what: str, error: type[MassMergeError] = MassMergeError) -> Any:
    """A JSON file from a user or a stranger: at most MAX_MANIFEST_BYTES of UTF-8, bounded nesting; every failure
    is one ``error`` line naming the file (``what`` says what it should have been)."""
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise error(f"{path}: {path.stat().st_size} bytes is too large for {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not readable UTF-8 text ({type(exc).__name__})") from None
    return parse_json_text(text, str(path))


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Parse and validate ``manifest.json``; refuse unknown format versions before anything else."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise MassMergeError(f"{directory}: no such artifact directory")
    if path.is_symlink() or not path.is_file():
        raise MassMergeError(f"{path}: missing (or not a plain file); '{directory}' is not a massmerge artifact")
    raw = read_json_file(path, "a manifest")
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version == 1:
        raise MassMergeError(f"{path}: format_version 1 (massmerge 0.1) is no longer read; rebuild the artifact "
                             "with `massmerge build` from the same base, experts and heads")
    if version != FORMAT_VERSION:
        raise MassMergeError(
            f"{path}: format_version {version!r} is not supported (this massmerge reads version {FORMAT_VERSION})")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MassMergeError(f"{path}: invalid manifest field '{where}' ({first['msg']})") from None
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest: Manifest, path: Path) -> None:
    """Cross-field rules pydantic cannot state: unique task names, ranks and accepted indices per task."""
    names = manifest.task_names
    T = len(names)
    for name in names:
        if not name or "/" in name:
            raise MassMergeError(f"{path}: field 'task_names' holds an invalid name {name!r}")
    if len(set(names)) != T:
        raise MassMergeError(f"{path}: field 'task_names' lists a task twice")
    if [h.task for h in manifest.heads] != names:
        raise MassMergeError(f"{path}: field 'heads' does not list one head per task, in task order")
    for key, ranks in manifest.ranks.items():
        if len(ranks) != T or any(r < 0 for r in ranks):
            raise MassMergeError(f"{path}: field 'ranks.{key}' must hold {T} non-negative ranks")
    for key, kept in manifest.accepted.items():
        if key not in manifest.ranks:
            raise MassMergeError(f"{path}: field 'accepted.{key}' names a key without factors")
        if not kept or len(set(kept)) != len(kept) or any(not 0 <= t < T for t in kept):
            raise MassMergeError(f"{path}: field 'accepted.{key}' must hold distinct task indices in [0, {T})")
    for entry in manifest.heads:
        if entry.kind == "zero_shot" and (entry.logit_scale is None or not math.isfinite(entry.logit_scale)
                                          or entry.logit_scale <= 0):
            raise MassMergeError(f"{path}: field 'heads.{entry.task}.logit_scale' must be finite and positive")
        if entry.class_names is not None and len(entry.class_names) != entry.num_classes:
            raise MassMergeError(f"{path}: field 'heads.{entry.task}.class_names' has {len(entry.class_names)} "
                                 f"names for {entry.num_classes} classes")
    check_file_names(manifest, path)
    check_base_entry(manifest, path)


def check_file_names(manifest: Manifest, path: Path) -> None:
    """Every listed name is a plain relative name of a file an artifact may hold (see :func:`allowed_name`)."""
    for name in manifest.files:
        pure = PurePosixPath(name)
        if not name or pure.is_absolute() or "\\" in name or any(part in ("..", ".", "") for part in name.split("/")):
            raise MassMergeError(f"{path}: field 'files' lists '{name}', which is not a plain relative name "
                                 "inside the artifact")
        if not allowed_name(name):
            raise MassMergeError(f"{path}: field 'files' lists '{name}', a file an artifact may not hold (only "
                                 f"{FACTORS_FILE}, {HEADS_FILE}, {BASE_FILE} and {MODEL_DIR}/ with config.json, "
                                 f"{HF_WEIGHTS} and tokenizer files)")


def allowed_name(name: str) -> bool:
    """Whether an artifact may hold a file of this relative name: the files :func:`save_artifact` writes.

    Why a closed list: whatever sits in ``model/`` is handed to transformers, which would pick up a pickle
    weights file or a modelling ``.py`` file on its own; an artifact holds data files only.
    """
    parts = name.split("/")
    if len(parts) == 1:
        return name in (FACTORS_FILE, HEADS_FILE, BASE_FILE)
    if len(parts) != 2 or parts[0] != MODEL_DIR:
        return False
    return model_file_allowed(parts[1])


def model_file_allowed(file_name: str) -> bool:
    """A file ``model/`` may hold: the HF config, the safetensors weights, tokenizer/processor data files."""
    from massmerge.checkpoints import PICKLE_SUFFIXES

    if file_name in ("config.json", HF_WEIGHTS):
        return True
    suffix = PurePosixPath(file_name).suffix
    if suffix in (".py", ".safetensors", *PICKLE_SUFFIXES):
        return False
    return any(fnmatch.fnmatchcase(file_name, pattern) for pattern in TOKENIZER_PATTERNS)


def check_base_entry(manifest: Manifest, path: Path) -> None:
    """An embedded base is a listed file (``model/model.safetensors`` for an adapter artifact, which transformers
    reads from ``model/``); a reference is only for a generic module and names an absolute path, bytes, sha256."""
    base = manifest.base
    if base.mode == "embedded":
        expected = f"{MODEL_DIR}/{HF_WEIGHTS}" if manifest.architecture.kind == "adapter" else BASE_FILE
        if base.file != expected or base.file not in manifest.files:
            raise MassMergeError(f"{path}: field 'base.file' must be '{expected}', a listed file")
        return
    if manifest.architecture.kind == "adapter":
        raise MassMergeError(f"{path}: field 'base.mode' is 'reference', but an adapter artifact must embed its "
                             f"base in {MODEL_DIR}/")
    if not base.path or not PurePosixPath(base.path).is_absolute() or not base.sha256 or base.bytes is None:
        raise MassMergeError(f"{path}: field 'base' must name the referenced file's absolute path, bytes and sha256")


def verify_files(directory: Path, manifest: Manifest, *, checksums: bool = True) -> None:
    """Confinement and integrity, checked with ``lstat`` before any listed file is opened: nothing in
    ``directory`` is a symlink, a FIFO, a device or an unlisted file or directory; every listed file is a
    regular file with its size and (``checksums``) sha256; the required files are listed; a referenced base
    matches its recorded size and sha256."""
    directory = Path(directory)
    _check_entries(directory, manifest)
    required = [FACTORS_FILE, HEADS_FILE] + ([manifest.base.file] if manifest.base.file else [])
    if manifest.architecture.kind == "adapter":
        required.append(f"{MODEL_DIR}/config.json")
    for name in required:
        if name not in manifest.files:
            raise MassMergeError(f"{directory / name}: required but not listed in {MANIFEST}")
    for name, entry in manifest.files.items():
        path = directory / name
        if not path.is_file() or path.is_symlink():
            raise MassMergeError(f"{path}: missing from the artifact (it is listed in {MANIFEST})")
        if path.stat().st_size != entry.bytes or (checksums and sha256_file(path) != entry.sha256):
            raise MassMergeError(f"{path}: checksum mismatch (the file is corrupt or was modified)")
    if manifest.base.mode == "reference":
        ref = Path(manifest.base.path or "")
        if ref.is_symlink() or not ref.is_file():
            raise MassMergeError(f"{ref}: referenced base checkpoint is missing (or not a plain file)")
        if ref.stat().st_size != manifest.base.bytes or (checksums and sha256_file(ref) != manifest.base.sha256):
            raise MassMergeError(f"{ref}: checksum mismatch with the base the artifact was built from")


def _check_entries(directory: Path, manifest: Manifest) -> None:
    """Every entry under ``directory`` (by ``lstat``: nothing is followed or opened) is the manifest, a listed
    regular file or a directory holding listed files."""
    listed = set(manifest.files)
    folders = {parent.as_posix() for name in listed for parent in PurePosixPath(name).parents} - {"."}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise MassMergeError(f"{path}: a symlink inside the artifact is refused")
        if stat.S_ISDIR(mode):
            if name not in folders:
                raise MassMergeError(f"{path}: a directory {MANIFEST} does not list; refusing the artifact")
        elif not stat.S_ISREG(mode):
            raise MassMergeError(f"{path}: not a regular file (a FIFO, socket or device); refusing the artifact")
        elif name != MANIFEST and name not in listed:
            raise MassMergeError(f"{path}: not listed in {MANIFEST}; refusing an artifact with unlisted files")


def _read_safetensors(path: Path, where: str | None = None, expected: Collection[str] | None = None
                      ) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; with ``expected``, a tensor the manifest does not describe is refused
    from the header, before any tensor is read."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            unexpected = sorted(set(keys) - set(expected)) if expected is not None else []
            if unexpected:
                raise MassMergeError(f"{where or path}: tensor '{unexpected[0]}' is not described by {MANIFEST} "
                                     f"({len(unexpected)} such tensors)")
            return {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, OSError, ValueError) as exc:
        raise MassMergeError(f"{where or path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None


def _need(tensors: Mapping[str, torch.Tensor], key: str, path: Path, shape: Sequence[int] | None = None
          ) -> torch.Tensor:
    if key not in tensors:
        raise MassMergeError(f"{path}: tensor '{key}' is missing")
    value = tensors[key]
    if shape is not None and list(value.shape) != list(shape):
        raise MassMergeError(f"{path}: tensor '{key}' has shape {list(value.shape)}, expected {list(shape)}")
    if not value.is_floating_point() or not all_finite(value):
        raise MassMergeError(f"{path}: tensor '{key}' is not finite floating-point data")
    return value.to(torch.promote_types(value.dtype, torch.float32))


def load_factors(directory: Path, manifest: Manifest, shapes: Mapping[str, Sequence[int]]) -> ExpertFactors:
    """Rebuild the :class:`ExpertFactors` (float32, or float64 if stored so), every tensor's shape checked
    against the model parameter it belongs to and the rank the manifest records."""
    path = directory / FACTORS_FILE
    expected = [f"factors/{task}/{key}/{part}" for task in manifest.task_names for key in manifest.ranks
                for part in "UsV"]
    expected += [f"non_matrix/{task}/{key}" for task in manifest.task_names for key in manifest.non_matrix_keys]
    tensors = _read_safetensors(path, expected=expected)
    for key in [*manifest.ranks, *manifest.non_matrix_keys]:
        if key not in shapes:
            raise MassMergeError(f"{directory / MANIFEST}: factor key '{key}' is not a parameter of the base model")
    for key in manifest.ranks:
        if len(shapes[key]) != 2:
            raise MassMergeError(f"{directory / MANIFEST}: field 'ranks.{key}' names a parameter of shape "
                                 f"{list(shapes[key])}, not a matrix")
    matrices: dict[str, list[LowRank]] = {}
    for key, ranks in manifest.ranks.items():
        m, n = shapes[key]
        if any(k > min(m, n) for k in ranks):
            raise MassMergeError(f"{directory / MANIFEST}: field 'ranks.{key}' exceeds min(m, n) = {min(m, n)}")
        matrices[key] = [LowRank(_need(tensors, f"factors/{task}/{key}/U", path, (m, k)),
                                 _need(tensors, f"factors/{task}/{key}/s", path, (k,)),
                                 _need(tensors, f"factors/{task}/{key}/V", path, (n, k)))
                         for task, k in zip(manifest.task_names, ranks)]
    non_matrix = {key: [_need(tensors, f"non_matrix/{task}/{key}", path, shapes[key]) for task in manifest.task_names]
                  for key in manifest.non_matrix_keys}
    accepted = {key: manifest.accepted.get(key, list(range(len(manifest.task_names)))) for key in manifest.ranks}
    return ExpertFactors(task_names=list(manifest.task_names), rank_fraction=manifest.rank_fraction,
                         matrices=matrices, non_matrix=non_matrix, accepted=accepted, eps=manifest.build.eps)


def load_heads(directory: Path, manifest: Manifest, feature_dim: int | None) -> list[nn.Module]:
    """The heads, with their stored weights exactly (a zero-shot head's weight is not re-normalized), each
    checked: rows = num_classes, width = the model's feature size (or the other heads' width)."""
    path = directory / HEADS_FILE
    expected = [f"heads/{h.task}/{part}" for h in manifest.heads
                for part in (("weight", "bias") if h.kind == "linear" else ("weight",))]
    tensors = _read_safetensors(path, expected=expected)
    heads: list[nn.Module] = []
    width = feature_dim
    for entry in manifest.heads:
        weight = _need(tensors, f"heads/{entry.task}/weight", path)
        if weight.ndim != 2 or weight.shape[0] != entry.num_classes:
            raise MassMergeError(f"{path}: tensor 'heads/{entry.task}/weight' has shape {list(weight.shape)}; "
                                 f"the manifest says {entry.num_classes} classes")
        width = width or int(weight.shape[1])
        if weight.shape[1] != width:
            raise MassMergeError(f"{path}: tensor 'heads/{entry.task}/weight' is {weight.shape[1]} wide; the "
                                 f"model's features are {width} wide")
        if entry.kind == "zero_shot":
            head: nn.Module = ZeroShotHead(weight, float(entry.logit_scale))  # type: ignore[arg-type]
            head.weight.copy_(weight)
        else:
            bias_key = f"heads/{entry.task}/bias"
            bias = _need(tensors, bias_key, path, (entry.num_classes,)) if bias_key in tensors else None
            head = LinearHead(weight, bias)
        heads.append(head)
    return heads


def _base_state(directory: Path, manifest: Manifest) -> tuple[Path, dict[str, torch.Tensor]]:
    """(file, tensors) of the base: the embedded file or the verified reference; every value finite."""
    from massmerge.checkpoints import check_finite

    path = Path(manifest.base.path or "") if manifest.base.mode == "reference" else directory / (manifest.base.file or BASE_FILE)
    state = _read_safetensors(path)
    check_finite(state, name=str(path))
    return path, state


def load(
    directory: str | os.PathLike[str],
    *,
    base_model: nn.Module | None = None,
    pool: PoolFn | None = None,
    features: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    verify: bool = True,
    strategy: Strategy = "auto",
    router: str | None = None,
    **serve: Any,
) -> MASSModel:
    """Load an artifact as a :class:`~massmerge.mass.MASSModel`; keyword arguments override serve settings.

    ``serve`` keys are :class:`~massmerge.mass.config.ServeSettings` fields (``eta=0.1``, ``top_k=1``,
    ``head_rule='posterior'``, ``routing_layers=(...)``, ``pooling='content'``, ...); ``router='paper'``
    applies a named router rule first. Artifacts with an adapter rebuild their module from ``model/``; generic
    ones need ``base_model`` (its weights are replaced by the artifact's base) and the ``pool``/``features``
    functions used at build. ``verify`` checks every file's sha256 first (on by default; sizes, confinement and
    tensor structure are always checked).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest, checksums=verify)
    arch = manifest.architecture
    adapter = None
    if arch.kind == "adapter":
        adapter, module = _load_adapter_model(directory, manifest)
        pool = pool or adapter.pool
        features = features or adapter.features
    else:
        if base_model is None:
            raise OptionError(f"{directory}: a generic-module artifact needs load(..., base_model=<the nn.Module>)")
        module = base_model
        _load_base_into(module, _base_state(directory, manifest), "base_model")
    check_routing_layers(manifest, module, directory)
    shapes = {key: list(value.shape) for key, value in module.state_dict().items()}
    factors = load_factors(directory, manifest, shapes)
    feature_dim = adapter.feature_dim(module) if adapter is not None else None
    heads = load_heads(directory, manifest, feature_dim)
    settings = serve_settings(manifest, router=router, adapter=adapter, **serve)
    model = MASSModel(module.eval(), factors, heads, settings, pool=pool or identity_pool,
                      features=features or default_features, strategy=strategy)
    model.manifest = manifest  # type: ignore[attr-defined]
    model.adapter = adapter  # type: ignore[attr-defined]
    return model


def check_routing_layers(manifest: Manifest, module: nn.Module, directory: Path) -> None:
    """The manifest's routing layers are factored ``nn.Linear`` modules of the rebuilt model (so a bad one
    is blamed on the manifest field, not on a flag the user never passed)."""
    modules = dict(module.named_modules())
    for layer in manifest.serve.routing_layers:
        if not isinstance(modules.get(layer), nn.Linear) or f"{layer}.weight" not in manifest.ranks:
            raise MassMergeError(f"{directory / MANIFEST}: field 'serve.routing_layers' names '{layer}', which is "
                                 "not a factored nn.Linear of the model")
    if not manifest.serve.routing_layers:
        raise MassMergeError(f"{directory / MANIFEST}: field 'serve.routing_layers' is empty")


def serve_settings(manifest: Manifest, *, router: str | None = None, adapter: Any | None = None,
                   **overrides: Any) -> ServeSettings:
    """The artifact's serve settings with a named router rule and explicit overrides applied (in that order)."""
    from massmerge.mass.config import apply_profile

    settings = manifest.serve
    if router is not None:
        family_pooling = getattr(adapter, "paper_pooling", None) if adapter is not None else None
        settings = apply_profile(settings, router, default_layer=settings.routing_layers[-1],
                                 family_pooling=family_pooling)
    unknown = sorted(set(overrides) - set(ServeSettings.model_fields))
    if unknown:
        raise OptionError(f"load: '{unknown[0]}' is not a serve setting (choose from "
                          f"{', '.join(ServeSettings.model_fields)})")
    return settings.updated(**overrides)


def _load_base_into(module: nn.Module, base: tuple[Path, Mapping[str, torch.Tensor]], what: str) -> None:
    """Put the artifact's base tensors, exactly as stored, into ``module`` (``what`` names it in errors); keys
    and shapes must match."""
    path, state = base
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        detail = (f"the model's tensor '{missing[0]}' is not in this file" if missing
                  else f"tensor '{extra[0]}' is not a parameter of the model")
        raise MassMergeError(f"{path}: does not match {what}: {detail} ({len(missing) + len(extra)} keys differ)")
    for key, value in own.items():
        if value.shape != state[key].shape:
            raise MassMergeError(f"{path}: tensor '{key}' has shape {list(state[key].shape)}, {what} has "
                                 f"{list(value.shape)}")
    module.load_state_dict(dict(state), strict=True, assign=True)  # the stored tensors as they are: exact


def _load_adapter_model(directory: Path, manifest: Manifest) -> tuple[Any, nn.Module]:
    """Rebuild the adapter's module from ``model/`` (verified; no custom code) with the stored base tensors."""
    from massmerge.adapters import get_adapter
    from massmerge.adapters.base import refuse_remote_code
    from massmerge.progress import quiet_third_party

    refuse_remote_code(directory / MODEL_DIR)
    arch = manifest.architecture
    try:
        adapter = get_adapter(arch.adapter or "", **arch.options.model_dump(exclude_none=True))
    except OptionError as exc:
        raise MassMergeError(f"{directory / MANIFEST}: field 'architecture' is not usable ({exc})") from None
    with quiet_third_party():  # a mismatch is reported by our own check below, in one line
        module = adapter.load_model(str(directory / MODEL_DIR))
    _load_base_into(module, _base_state(directory, manifest), f"the model built from {MODEL_DIR}/config.json")
    return adapter.bind(module), module


def base_file_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes of the base as the artifact holds it: the files of ``model/`` (weights, config, tokenizer) or the
    base's safetensors file; for a referenced base, that file. The denominator of "N x the base"."""
    manifest = read_manifest(directory)
    if manifest.base.mode == "reference":
        return int(manifest.base.bytes or 0)
    if manifest.architecture.kind == "adapter":
        return sum(e.bytes for name, e in manifest.files.items() if name.startswith(f"{MODEL_DIR}/"))
    return manifest.files[manifest.base.file or BASE_FILE].bytes


def artifact_bytes(directory: str | os.PathLike[str], *, include_base: bool = True) -> int:
    """Total size of an artifact's files (manifest included); without the base file when asked."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    total = (directory / MANIFEST).stat().st_size + sum(e.bytes for e in manifest.files.values())
    if not include_base and manifest.base.file is not None:
        total -= manifest.files[manifest.base.file].bytes
    return total


__all__ = [
    "FORMAT_VERSION", "Manifest", "artifact_bytes", "base_file_bytes", "check_output_directory", "factor_storage", "float_dtype", "load", "read_head_file",
    "read_manifest", "round_factors", "save_artifact", "serve_settings", "storage_dtype", "verify_files",
    "write_head_file",
]
