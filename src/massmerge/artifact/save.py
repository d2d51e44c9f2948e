"""Write a MASS model as an artifact directory: safetensors tensors, the base, and the manifest, atomically.

:func:`write_artifact` writes from a MASS model's parts (``massmerge build`` calls it with the factors already
in their storage dtype, so writing makes no second copy of them); :func:`save_artifact` saves a served
:class:`~massmerge.mass.MASSModel`. The whole directory is written in a temp directory next to the output and
swapped into place (:func:`massmerge.io.atomic.write_directory_atomically`): a failure leaves an earlier
artifact at the same path untouched, and a directory that is not an artifact is never replaced.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from massmerge.adapter_options import recorded_options
from massmerge.artifact.manifest import (
    BASE_FILE,
    FACTORS_FILE,
    FORMAT_VERSION,
    HEADS_FILE,
    HF_WEIGHTS,
    MANIFEST,
    MODEL_DIR,
    AdapterOptions,
    ArchitectureEntry,
    BaseEntry,
    FileEntry,
    HeadEntry,
    Manifest,
    factor_name,
    head_name,
    is_shard_name,
    model_file_allowed,
    non_matrix_name,
    shard_name,
)
from massmerge.artifact.verify import sha256_file
from massmerge.checkpoints import HF_SHARD_INDEX
from massmerge.choices import check_task_names
from massmerge.errors import OptionError
from massmerge.heads.modules import LinearHead, ZeroShotHead
from massmerge.io.atomic import fsync_file, write_directory_atomically
from massmerge.io.jsonfile import read_json_file
from massmerge.io.tensors import read_safetensors, save_tensors
from massmerge.mass.config import BuildSettings, ServeSettings
from massmerge.mass.experts import ExpertFactors
from massmerge.mass.model import MASSModel
from massmerge.mass.storage import dtype_name, float_dtype, parse_dtype, storage_dtype


def check_output_directory(directory: Path) -> None:
    """An output path may be new, an empty directory or an earlier artifact (replaced); anything else may be
    the user's data and is refused (``massmerge build`` checks this before its first SVD)."""
    directory = Path(directory)
    if directory.is_symlink() or (directory.exists() and (not directory.is_dir() or (
            any(directory.iterdir()) and not (directory / MANIFEST).is_file()))):
        raise OptionError(f"--output '{directory}' exists and is not a massmerge artifact; refusing to replace it")


def factor_tensors(factors: ExpertFactors, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The factors as flat safetensors keys; U, V and non-matrix deltas in ``dtype``, s in float32 or wider."""
    s_dtype = torch.promote_types(dtype, torch.float32)
    out: dict[str, torch.Tensor] = {}
    for t, task in enumerate(factors.task_names):
        for key, per_task in factors.matrices.items():
            f = per_task[t]
            out[factor_name(task, key, "U")] = f.U.to(dtype)
            out[factor_name(task, key, "s")] = f.s.to(s_dtype)
            out[factor_name(task, key, "V")] = f.V.to(dtype)
        for key, per_task in factors.non_matrix.items():
            out[non_matrix_name(task, key)] = per_task[t].to(dtype)
    return out


def head_entries(heads: Sequence[nn.Module], task_names: Sequence[str],
                 class_names: Sequence[Sequence[str] | None] | None) -> tuple[list[HeadEntry], dict[str, torch.Tensor]]:
    """Manifest entries and tensors of the heads (LinearHead or ZeroShotHead)."""
    entries, tensors = [], {}
    if not heads:  # a model that generates has no class heads
        return entries, tensors
    for t, (task, head) in enumerate(zip(task_names, heads, strict=True)):
        names = list(class_names[t]) if class_names and class_names[t] is not None else None
        if isinstance(head, ZeroShotHead):
            entries.append(HeadEntry(task=task, kind="zero_shot", num_classes=head.num_classes,
                                     logit_scale=head.logit_scale, class_names=names))
        elif isinstance(head, LinearHead):
            entries.append(HeadEntry(task=task, kind="linear", num_classes=head.num_classes, class_names=names))
            if head.bias is not None:
                tensors[head_name(task, "bias")] = head.bias
        else:
            raise OptionError(f"heads: task '{task}' has a {type(head).__name__}; only LinearHead/ZeroShotHead save")
        if names is not None and len(names) != head.num_classes:
            raise OptionError(f"heads: task '{task}' has {head.num_classes} classes but {len(names)} class names")
        tensors[head_name(task, "weight")] = head.weight
    return entries, tensors


def save_artifact(model: MASSModel, directory: str | os.PathLike[str], **options: Any) -> Path:
    """Write ``model`` (with its serve settings as the artifact's defaults) as an artifact directory: its base,
    factors, heads and settings, by :func:`write_artifact` (which documents the options).

    What the model carries is kept (:func:`carried_options`): its class names, and for a model from ``load()``
    its adapter (architecture and options), build settings, rank scale, factor dtype, HF config, tokenizer files
    and base reference, so ``save_artifact(load(x), y)`` writes ``x`` again. ``options`` override any of them.
    """
    return write_artifact(directory, base_model=model.model, factors=model.factors, heads=list(model.heads),
                          serve=model.settings, **{**carried_options(model), **options})


def carried_options(model: MASSModel) -> dict[str, Any]:
    """The :func:`write_artifact` options a model carries: class names, and what ``load()`` read from its
    artifact (the manifest, the bound adapter and the artifact's ``model/`` directory)."""
    options: dict[str, Any] = {}
    if not len(model.heads):
        options["output_kind"] = "generate"
    if model.class_names is not None and any(names is not None for names in model.class_names):
        options["class_names"] = model.class_names
    if model.adapter is not None:
        options["adapter"] = model.adapter
    manifest: Manifest | None = model.manifest
    if manifest is None:
        return options
    options.update(build=manifest.build, rank_scale=manifest.rank_scale, factor_dtype=manifest.factor_dtype)
    if manifest.base.max_shard_bytes is not None:
        options["base_shard_bytes"] = manifest.base.max_shard_bytes
    if manifest.base.mode == "reference":
        options["base_reference"] = manifest.base.path
    model_dir = manifest.directory / MODEL_DIR if manifest.directory is not None else None
    if manifest.architecture.kind == "adapter" and model_dir is not None and model_dir.is_dir():  # still there
        options["tokenizer_dir"] = model_dir
        if (model_dir / "config.json").is_file():
            options["hf_config"] = read_json_file(model_dir / "config.json", "an HF config")
    return options


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
    output_kind: str | None = None,
    base_shard_bytes: int | None = None,
) -> Path:
    """Write an artifact directory from a MASS model's parts (``massmerge build`` writes them without making
    the serving model, and with the factors already in their storage dtype, so that writing them makes no
    second copy: :func:`to_storage`).

    With ``adapter`` (a bound :class:`~massmerge.adapters.BaseAdapter`) and the model's HF config (taken from
    ``base_model.config`` when not given) the base is written as an HF model directory ``model/`` that
    :func:`load` rebuilds by itself; otherwise the base's tensors are stored (or referenced by
    ``base_reference``, a safetensors file holding exactly them) and ``load`` needs ``base_model=``.
    ``factor_dtype`` None picks :func:`storage_dtype` of the base. ``output_kind``: ``classify`` or ``generate``
    (default: ``generate`` when there are no heads). ``base_shard_bytes`` writes an adapter's base in shards
    of at most that many tensor bytes (:func:`shard_plan`; ``massmerge build`` passes the source base's largest
    shard, so a base that came sharded stays sharded and one that came as one file stays one file). Writes are
    atomic.
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
    if base_shard_bytes is not None and (architecture.kind != "adapter" or base_shard_bytes < 1):
        raise OptionError("base_shard_bytes: only an adapter's model/ is sharded, in shards of at least 1 byte")
    build = (build or BuildSettings()).model_copy(update={"eps": factors.eps, "factor_dtype": dtype_name(store)})

    def fill(tmp: Path) -> None:
        save_tensors(factor_tensors(factors, store), tmp / FACTORS_FILE)
        save_tensors(head_tensors, tmp / HEADS_FILE)
        base = _write_base(tmp, base_model, base_state, architecture, hf_config, tokenizer_dir, base_reference,
                           base_dtype, base_shard_bytes)
        manifest = Manifest(
            format_version=FORMAT_VERSION, massmerge_version=_version(), task_names=list(factors.task_names),
            output=output_kind or ("classify" if heads else "generate"),
            build=build, rank_fraction=factors.rank_fraction, rank_scale=rank_scale, serve=serve,
            ranks={key: [f.rank for f in per_task] for key, per_task in factors.matrices.items()},
            accepted=factors.accepted, non_matrix_keys=list(factors.non_matrix), factor_dtype=dtype_name(store),
            base=base, architecture=architecture, heads=entries, files=_file_entries(tmp),
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        fsync_file(tmp / MANIFEST)

    check_output_directory(directory)
    write_directory_atomically(directory, fill)
    return directory


def _architecture(base_model: nn.Module, adapter: Any | None, hf_config: Mapping[str, Any] | None
                  ) -> ArchitectureEntry:
    if adapter is None:
        return ArchitectureEntry(kind="module")
    if hf_config is None and getattr(base_model, "config", None) is None:
        raise OptionError("adapter: the model has no HF config; pass hf_config=... or save it as a generic module")
    options = AdapterOptions(**recorded_options(adapter))  # every declared option the adapter holds
    return ArchitectureEntry(kind="adapter", adapter=adapter.name, options=options, pooling=adapter.pooling)


def _write_base(tmp: Path, base_model: nn.Module, state: Mapping[str, torch.Tensor], architecture: ArchitectureEntry,
                hf_config: Mapping[str, Any] | None, tokenizer_dir: str | os.PathLike[str] | None,
                base_reference: str | os.PathLike[str] | None, base_dtype: torch.dtype,
                shard_bytes: int | None = None) -> BaseEntry:
    dtype = dtype_name(base_dtype)
    if base_reference is not None:
        ref = Path(base_reference).resolve()
        _check_reference_matches(ref, state)
        return BaseEntry(mode="reference", dtype=dtype, path=str(ref), sha256=sha256_file(ref),
                         bytes=ref.stat().st_size)
    if architecture.kind == "module":
        save_tensors(state, tmp / BASE_FILE)
        return BaseEntry(mode="embedded", dtype=dtype, file=BASE_FILE)
    model_dir = tmp / MODEL_DIR
    model_dir.mkdir()
    config = dict(hf_config) if hf_config is not None else base_model.config.to_dict()
    (model_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    plan = shard_plan(state, shard_bytes) if shard_bytes is not None else [list(state)]
    if len(plan) == 1:  # as transformers: a base that fits one shard is one model.safetensors, no index
        save_tensors(state, model_dir / HF_WEIGHTS, metadata={"format": "pt"})
        entry = BaseEntry(mode="embedded", dtype=dtype, file=f"{MODEL_DIR}/{HF_WEIGHTS}")
    else:
        _write_shards(model_dir, state, plan, parameters=sum(p.numel() for p in base_model.parameters()))
        entry = BaseEntry(mode="embedded", dtype=dtype, file=f"{MODEL_DIR}/{HF_SHARD_INDEX}",
                          max_shard_bytes=shard_bytes)
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), model_dir)
    return entry


def shard_plan(state: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """The keys of each shard: transformers' split (``huggingface_hub.split_torch_state_dict_into_shards``, what
    ``save_pretrained(max_shard_size=...)`` runs): keys in order fill a shard until the next would pass
    ``max_bytes``; a tensor above it alone gets a shard of its own, placed where it came. Sizes are each tensor's
    own bytes, not its storage's, so a loaded model (whose tensors may share one storage, or not) is split the
    same way again and ``save_artifact(load(x))`` writes ``x``'s shards."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if nbytes > max_bytes:
            shards.append([key])
            continue
        if size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    return shards + [current] if current else shards


def _write_shards(model_dir: Path, state: Mapping[str, torch.Tensor], plan: Sequence[Sequence[str]], *,
                  parameters: int) -> None:
    """The shards and ``model.safetensors.index.json`` with transformers' names and index layout (a tied alias is
    a copy in its own shard, as in the one-file layout; transformers reads either)."""
    weight_map: dict[str, str] = {}
    for number, keys in enumerate(plan, start=1):
        name = shard_name(number, len(plan))
        save_tensors({key: state[key] for key in keys}, model_dir / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(value.numel() * value.element_size() for value in state.values())
    index = {"metadata": {"total_parameters": parameters, "total_size": total}, "weight_map": weight_map}
    (model_dir / HF_SHARD_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    fsync_file(model_dir / HF_SHARD_INDEX)


def _copy_tokenizer(source: Path, target: Path) -> None:
    """The base directory's tokenizer/processor files that an artifact may hold (:func:`model_file_allowed`);
    never its config or weights (written from the model itself)."""
    for file in sorted(source.iterdir()):
        weights = file.name in ("config.json", HF_WEIGHTS, HF_SHARD_INDEX) or is_shard_name(file.name)
        if not weights and model_file_allowed(file.name) and file.is_file() and not file.is_symlink():
            shutil.copyfile(file, target / file.name)


def _check_reference_matches(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    tensors, _ = read_safetensors(path, where="base_reference")
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



__all__ = ["carried_options", "check_output_directory", "factor_tensors", "save_artifact", "shard_plan",
           "write_artifact"]
