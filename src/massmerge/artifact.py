"""A deployable MASS model on disk: safetensors tensors plus a JSON manifest, saved once and served.

Layout of an artifact directory::

    manifest.json            format_version, tasks, every hyper-parameter, heads, base, sha256 of every file
    factors.safetensors      factors/{task}/{key}/U|s|V per matrix, non_matrix/{task}/{key} per other key
    heads.safetensors        heads/{task}/weight (+ heads/{task}/bias)
    model/                   an HF model directory (config.json, model.safetensors, tokenizer files) when the
                             architecture comes from an adapter, so ``load`` can rebuild the module by itself
    base.safetensors         the base's tensors for a generic ``nn.Module`` (``load(dir, base_model=...)``)

The base may instead be a *reference* (path + sha256 of a safetensors file) to avoid a second copy.

Why the factor dtype: a task keeps ``k (m + n + 1)`` numbers per matrix with ``k = min(m, n) / T``, so the T
tasks together store ``(1 + min/max)`` times each matrix: up to 2x for square matrices. With an fp32 base and
fp32 factors an artifact would be 2.2-2.6x the base; factors (orthonormal U, V with entries <= 1) lose nothing
that matters in float16, so by default they are stored in float16 for 32/64-bit bases (about 1.6-1.8x) and in
the base's own dtype for 16-bit bases. :func:`round_factors` applies the same rounding in memory, which is what
``massmerge build`` does, so a saved artifact predicts bit-identically to the model that was built.

Writes are atomic (a temp directory next to the output, then renames); a manifest of an unknown version, a
missing file or a checksum mismatch is refused with a :class:`~massmerge.errors.MassMergeError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from massmerge.errors import MassMergeError, OptionError
from massmerge.heads import LinearHead, ZeroShotHead
from massmerge.lowrank import LowRank
from massmerge.mass.config import make_config
from massmerge.mass.experts import ExpertFactors
from massmerge.mass.fast import FastMASSModel
from massmerge.mass.model import MASSModel, default_features
from massmerge.mass.pooling import PoolFn, identity_pool

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FACTORS_FILE = "factors.safetensors"
HEADS_FILE = "heads.safetensors"
BASE_FILE = "base.safetensors"
MODEL_DIR = "model"
HF_WEIGHTS = "model.safetensors"
TOKENIZER_PATTERNS = ("tokenizer*", "vocab*", "merges*", "special_tokens_map.json", "*.model",
                      "preprocessor_config.json", "sentencepiece*", "added_tokens.json")
HASH_CHUNK = 1 << 20

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}


# ----- manifest ---------------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Strict):
    sha256: str
    bytes: int


class HeadEntry(_Strict):
    task: str
    kind: Literal["linear", "zero_shot"]
    num_classes: int
    logit_scale: float | None = None
    class_names: list[str] | None = None


class BaseEntry(_Strict):
    """Where the base weights live: inside the artifact (``file``) or a referenced safetensors file."""

    mode: Literal["embedded", "reference"]
    dtype: str
    file: str | None = None
    path: str | None = None
    sha256: str | None = None


class ArchitectureEntry(_Strict):
    """How to rebuild the module: an adapter family over ``model/``, or a user-supplied generic module."""

    kind: Literal["adapter", "module"]
    adapter: str | None = None
    options: dict[str, Any] = {}
    pooling: str | None = None


class Manifest(_Strict):
    format_version: int
    massmerge_version: str
    task_names: list[str]
    config: dict[str, Any]
    rank_fraction: float
    rank_scale: float = 1.0  # fraction of every task's rank kept to fit a size budget (mass/budget.py)
    eps: float | None
    accepted: dict[str, list[int]]
    matrix_keys: list[str]
    non_matrix_keys: list[str]
    factor_dtype: str
    base: BaseEntry
    architecture: ArchitectureEntry
    heads: list[HeadEntry]
    files: dict[str, FileEntry]


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


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(t.dtype)


def round_factors(factors: ExpertFactors, dtype: torch.dtype) -> ExpertFactors:
    """Factors rounded to ``dtype`` (storage) and back (compute): saving them in ``dtype`` is then lossless.

    Singular values stay in full precision (they are stored as float32 at least).
    """
    matrices = {key: [LowRank(_round(f.U, dtype), f.s, _round(f.V, dtype)) for f in per_task]
                for key, per_task in factors.matrices.items()}
    non_matrix = {key: [_round(t, dtype) for t in per_task] for key, per_task in factors.non_matrix.items()}
    return ExpertFactors(task_names=list(factors.task_names), rank_fraction=factors.rank_fraction,
                         matrices=matrices, non_matrix=non_matrix, accepted=dict(factors.accepted), eps=factors.eps)


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


def write_directory_atomically(directory: Path, fill: Callable[[Path], None]) -> None:
    """Run ``fill(tmp_dir)`` in a temp dir next to ``directory`` and swap it into place.

    A failure leaves no half-written ``directory``; an existing artifact there is replaced only once the new
    one is complete. A non-empty directory that is not an artifact is refused (it may be the user's data).
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or (any(directory.iterdir())
                                                          and not (directory / MANIFEST).is_file())):
        raise OptionError(f"--output '{directory}' exists and is not a massmerge artifact; refusing to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    old: Path | None = None
    try:
        fill(tmp)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
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


def check_task_names(names: Sequence[str]) -> None:
    for name in names:
        if not name or "/" in name:
            raise OptionError(f"--task-names: '{name}' is not a valid task name (non-empty, no '/')")


def save_artifact(
    model: MASSModel,
    directory: str | os.PathLike[str],
    *,
    adapter: Any | None = None,
    hf_config: Mapping[str, Any] | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    base_reference: str | os.PathLike[str] | None = None,
    factor_dtype: str | torch.dtype | None = None,
    class_names: Sequence[Sequence[str] | None] | None = None,
    pooling: str | None = None,
    rank_scale: float = 1.0,
) -> Path:
    """Write ``model`` as an artifact directory (atomically) and return its path.

    With ``adapter`` (a bound :class:`~massmerge.adapters.BaseAdapter`) and the model's HF config (taken from
    ``model.model.config`` when not given) the base is written as an HF model directory ``model/`` that
    :func:`load` rebuilds by itself; otherwise the base's tensors are stored (or referenced by
    ``base_reference``, a safetensors file holding exactly them) and ``load`` needs ``base_model=``.
    ``factor_dtype`` None picks :func:`storage_dtype` of the base.
    """
    directory = Path(directory)
    factors = model.factors
    check_task_names(factors.task_names)
    base_state = model.model.state_dict()
    base_dtype = float_dtype(base_state)
    store = parse_dtype(factor_dtype) if factor_dtype is not None else storage_dtype(base_dtype)
    entries, head_tensors = head_entries(list(model.heads), factors.task_names, class_names)
    architecture = _architecture(model, adapter, hf_config, pooling)
    if architecture.kind == "adapter" and base_reference is not None:
        raise OptionError("base_reference: only a generic module's base can be referenced, not an adapter's model")

    def fill(tmp: Path) -> None:
        _save_tensors(factor_tensors(factors, store), tmp / FACTORS_FILE)
        _save_tensors(head_tensors, tmp / HEADS_FILE)
        base = _write_base(tmp, model, base_state, architecture, hf_config, tokenizer_dir, base_reference, base_dtype)
        manifest = Manifest(
            format_version=FORMAT_VERSION, massmerge_version=_version(), task_names=list(factors.task_names),
            config=model.config.model_dump(), rank_fraction=factors.rank_fraction,
            rank_scale=rank_scale, eps=factors.eps, accepted=factors.accepted, matrix_keys=list(factors.matrices),
            non_matrix_keys=list(factors.non_matrix),
            factor_dtype=dtype_name(store), base=base, architecture=architecture, heads=entries,
            files=_file_entries(tmp),
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        _fsync(tmp / MANIFEST)

    write_directory_atomically(directory, fill)
    return directory


def float_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the first floating-point tensor: the base's own precision."""
    for value in state.values():
        if value.is_floating_point():
            return value.dtype
    raise OptionError("base model: has no floating-point parameter")


def _architecture(model: MASSModel, adapter: Any | None, hf_config: Mapping[str, Any] | None,
                  pooling: str | None) -> ArchitectureEntry:
    if adapter is None:
        return ArchitectureEntry(kind="module", pooling=pooling)
    if hf_config is None and getattr(model.model, "config", None) is None:
        raise OptionError("adapter: the model has no HF config; pass hf_config=... or save it as a generic module")
    options: dict[str, Any] = {"routing_layer": model.config.routing_layer, "pooling": adapter.pooling}
    if hasattr(adapter, "feature_pooling"):
        options["feature_pooling"] = adapter.feature_pooling
    return ArchitectureEntry(kind="adapter", adapter=adapter.name, options=options, pooling=adapter.pooling)


def _write_base(tmp: Path, model: MASSModel, state: Mapping[str, torch.Tensor], architecture: ArchitectureEntry,
                hf_config: Mapping[str, Any] | None, tokenizer_dir: str | os.PathLike[str] | None,
                base_reference: str | os.PathLike[str] | None, base_dtype: torch.dtype) -> BaseEntry:
    dtype = dtype_name(base_dtype)
    if base_reference is not None:
        ref = Path(base_reference).resolve()
        _check_reference_matches(ref, state)
        return BaseEntry(mode="reference", dtype=dtype, path=str(ref), sha256=sha256_file(ref))
    if architecture.kind == "module":
        _save_tensors(state, tmp / BASE_FILE)
        return BaseEntry(mode="embedded", dtype=dtype, file=BASE_FILE)
    model_dir = tmp / MODEL_DIR
    model_dir.mkdir()
    config = dict(hf_config) if hf_config is not None else model.model.config.to_dict()
    (model_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    _save_tensors(state, model_dir / HF_WEIGHTS, metadata={"format": "pt"})
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), model_dir)
    return BaseEntry(mode="embedded", dtype=dtype, file=f"{MODEL_DIR}/{HF_WEIGHTS}")


def _copy_tokenizer(source: Path, target: Path) -> None:
    for pattern in TOKENIZER_PATTERNS:
        for file in source.glob(pattern):
            if file.is_file() and file.suffix != ".safetensors":
                shutil.copyfile(file, target / file.name)


def _check_reference_matches(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    tensors = _read_safetensors(path)
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
    ``kind`` (zero_shot | linear), ``logit_scale``, ``class_names`` (JSON list) and ``task``."""
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
    """(head, task name or None, class names or None) from a ``--heads`` file; errors name the file."""
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
    kind = meta.get("kind", "linear")
    names = _class_names(meta, path, int(weight.shape[0]))
    if kind == "zero_shot":
        try:
            scale = float(meta.get("logit_scale", "100.0"))
        except ValueError:
            raise MassMergeError(f"{path}: metadata logit_scale is not a number") from None
        head: nn.Module = ZeroShotHead(weight, scale)
    elif kind == "linear":
        bias = tensors.get("bias")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise MassMergeError(f"{path}: 'bias' has shape {list(bias.shape)}, expected [{weight.shape[0]}]")
        head = LinearHead(weight, bias)
    else:
        raise MassMergeError(f"{path}: metadata kind '{kind}' is not zero_shot or linear")
    return head, meta.get("task"), names


def _class_names(meta: Mapping[str, str], path: Path, classes: int) -> list[str] | None:
    if "class_names" not in meta:
        return None
    try:
        names = json.loads(meta["class_names"])
    except ValueError:
        names = None
    if not isinstance(names, list) or len(names) != classes or not all(isinstance(n, str) for n in names):
        raise MassMergeError(f"{path}: metadata class_names must be a JSON list of {classes} strings")
    return names


# ----- load ---------------------------------------------------------------------------------------------------

def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Parse and validate ``manifest.json``; refuse unknown format versions before anything else."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise MassMergeError(f"{directory}: no such artifact directory")
    if not path.is_file():
        raise MassMergeError(f"{path}: missing; '{directory}' is not a massmerge artifact")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MassMergeError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise MassMergeError(
            f"{path}: format_version {version!r} is not supported (this massmerge reads version {FORMAT_VERSION})"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MassMergeError(f"{path}: invalid manifest field '{where}' ({first['msg']})") from None


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Every listed file exists with its size and sha256; the error names the first file that does not."""
    for name, entry in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise MassMergeError(f"{path}: missing from the artifact")
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise MassMergeError(f"{path}: checksum mismatch (the file is corrupt or was modified)")
    if manifest.base.mode == "reference":
        ref = Path(manifest.base.path or "")
        if not ref.is_file():
            raise MassMergeError(f"{ref}: referenced base checkpoint is missing")
        if sha256_file(ref) != manifest.base.sha256:
            raise MassMergeError(f"{ref}: checksum mismatch with the base the artifact was built from")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise MassMergeError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None


def _need(tensors: Mapping[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in tensors:
        raise MassMergeError(f"{path}: tensor '{key}' is missing")
    return tensors[key]


def load_factors(directory: Path, manifest: Manifest) -> ExpertFactors:
    """Rebuild the :class:`ExpertFactors` (computed in float32, or float64 if stored so)."""
    path = directory / FACTORS_FILE
    tensors = _read_safetensors(path)

    def get(key: str) -> torch.Tensor:
        value = _need(tensors, key, path)
        return value.to(torch.promote_types(value.dtype, torch.float32))

    matrices = {key: [LowRank(get(f"factors/{task}/{key}/U"), get(f"factors/{task}/{key}/s"),
                              get(f"factors/{task}/{key}/V")) for task in manifest.task_names]
                for key in manifest.matrix_keys}
    non_matrix = {key: [get(f"non_matrix/{task}/{key}") for task in manifest.task_names]
                  for key in manifest.non_matrix_keys}
    return ExpertFactors(task_names=list(manifest.task_names), rank_fraction=manifest.rank_fraction,
                         matrices=matrices, non_matrix=non_matrix, accepted=dict(manifest.accepted), eps=manifest.eps)


def load_heads(directory: Path, manifest: Manifest) -> list[nn.Module]:
    """The heads, with their stored weights exactly (a zero-shot head's weight is not re-normalized)."""
    path = directory / HEADS_FILE
    tensors = _read_safetensors(path)
    heads: list[nn.Module] = []
    for entry in manifest.heads:
        weight = _need(tensors, f"heads/{entry.task}/weight", path)
        if entry.kind == "zero_shot":
            head = ZeroShotHead(weight, entry.logit_scale if entry.logit_scale is not None else 100.0)
            head.weight.copy_(weight)
        else:
            head = LinearHead(weight, tensors.get(f"heads/{entry.task}/bias"))
        heads.append(head)
    return heads


def _base_state(directory: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    if manifest.base.mode == "reference":
        return _read_safetensors(Path(manifest.base.path or ""))
    return _read_safetensors(directory / (manifest.base.file or BASE_FILE))


def load(
    directory: str | os.PathLike[str],
    *,
    base_model: nn.Module | None = None,
    pool: PoolFn | None = None,
    features: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    verify: bool = True,
    **fast_options: Any,
) -> FastMASSModel:
    """Load an artifact as a :class:`FastMASSModel` (a MASSModel with the fast second pass).

    Artifacts with an adapter rebuild their module from ``model/``; generic ones need ``base_model`` (its
    weights are overwritten with the artifact's base) and the ``pool``/``features`` functions used at build.
    ``verify`` checks every file's sha256 first (on by default).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
    factors = load_factors(directory, manifest)
    heads = load_heads(directory, manifest)
    config = make_config(**manifest.config)
    arch = manifest.architecture
    if arch.kind == "adapter":
        adapter, module = _load_adapter_model(directory, manifest)
        pool = pool or adapter.pool
        features = features or adapter.features
    else:
        if base_model is None:
            raise OptionError(f"{directory}: a generic-module artifact needs load(..., base_model=<the nn.Module>)")
        module = base_model
        _load_base_into(module, _base_state(directory, manifest), directory)
    model = FastMASSModel(module.eval(), factors, heads, config, pool=pool or identity_pool,
                          features=features or default_features, **fast_options)
    model.manifest = manifest  # type: ignore[attr-defined]
    model.adapter = adapter if arch.kind == "adapter" else None  # type: ignore[attr-defined]
    return model


def _load_base_into(module: nn.Module, state: Mapping[str, torch.Tensor], directory: Path) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        key = (missing or extra)[0]
        raise MassMergeError(f"{directory}: base_model does not match the artifact's base (key '{key}')")
    for key, value in own.items():
        if value.shape != state[key].shape:
            raise MassMergeError(f"{directory}: base_model key '{key}' has shape {list(value.shape)}, "
                                 f"the artifact has {list(state[key].shape)}")
    module.load_state_dict(dict(state), strict=True, assign=True)  # the stored tensors as they are: exact


def _load_adapter_model(directory: Path, manifest: Manifest) -> tuple[Any, nn.Module]:
    from massmerge.adapters import get_adapter

    arch = manifest.architecture
    options = {k: v for k, v in arch.options.items() if v is not None}
    adapter = get_adapter(arch.adapter or "", **options)
    module = adapter.load_model(str(directory / MODEL_DIR))
    _load_base_into(module, _base_state(directory, manifest), directory)  # exact stored tensors, any dtype
    return adapter.bind(module), module


def artifact_bytes(directory: str | os.PathLike[str], *, include_base: bool = True) -> int:
    """Total size of an artifact's files (manifest included); without the base file when asked."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    total = (directory / MANIFEST).stat().st_size + sum(e.bytes for e in manifest.files.values())
    if not include_base and manifest.base.file is not None:
        total -= manifest.files[manifest.base.file].bytes
    return total


__all__ = [
    "FORMAT_VERSION", "Manifest", "artifact_bytes", "load", "read_head_file", "read_manifest", "round_factors",
    "save_artifact", "storage_dtype", "verify_files", "write_head_file",
]
