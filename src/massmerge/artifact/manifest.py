"""The manifest of a MASS artifact: its schema, the files an artifact may hold, and the cross-field rules.

Layout of an artifact directory (format 2)::

    manifest.json            format_version, tasks, build and serve settings, ranks, heads, base, every file
    factors.safetensors      factors/{task}/{key}/U|s|V per matrix, non_matrix/{task}/{key} per other key
    heads.safetensors        heads/{task}/weight (+ heads/{task}/bias)
    model/                   an HF model directory (config.json, model.safetensors, tokenizer files, and
                             generation_config.json for a model that generates: ``output`` 'generate') when the
                             architecture comes from an adapter, so ``load`` can rebuild the module by itself;
                             a base that came sharded keeps shards instead of model.safetensors:
                             model-0000i-of-0000N.safetensors and model.safetensors.index.json, as transformers
                             writes them (``base.file`` names the index, ``base.max_shard_bytes`` the split's limit)
    base.safetensors         the base's tensors for a generic ``nn.Module`` (``load(dir, base_model=...)``)

The base may instead be a *reference*: an explicit outside safetensors file named in the manifest with its size
and sha256, verified before it is read.

The manifest separates ``build`` settings (fixed: rank fraction and scale, eps, SVD, factor dtype) from
``serve`` settings (defaults that ``load(dir, eta=...)`` and ``massmerge predict --eta ...`` override without a
rebuild, including the pooling and max length the experts were trained with). ``ranks`` is the one record of
every task's rank per matrix; factor shapes are checked against it and against the model's parameters.

A manifest may come from a stranger: it is read as bounded JSON, every field is validated, and a failure is one
line naming the file and the field (``.../manifest.json: field 'heads.t1.logit_scale' ...``).
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model

from massmerge.adapter_options import ADAPTER_OPTIONS
from massmerge.checkpoints import HF_SHARD_INDEX, PICKLE_SUFFIXES
from massmerge.choices import DtypeName, task_name_problem
from massmerge.errors import MassMergeError, first_validation_error
from massmerge.io.jsonfile import read_json_file
from massmerge.mass.config import BuildSettings, Pooling, ServeSettings

if TYPE_CHECKING:  # torch-free at run time: `from massmerge.artifact import MANIFEST` stays cheap
    from massmerge.mass.experts import ExpertFactors


FORMAT_VERSION = 2
MANIFEST = "manifest.json"
FACTORS_FILE = "factors.safetensors"
HEADS_FILE = "heads.safetensors"
BASE_FILE = "base.safetensors"
MODEL_DIR = "model"
HF_WEIGHTS = "model.safetensors"
#: transformers' shard file names (``model-00001-of-00003.safetensors``), listed in ``model.safetensors.index.json``
SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
TOKENIZER_PATTERNS = ("tokenizer*", "vocab*", "merges*", "special_tokens_map.json", "*.model",
                      "preprocessor_config.json", "sentencepiece*", "added_tokens.json")


FACTOR_PARTS = ("U", "s", "V")  # a matrix's factors: U [m, k], s [k], V [n, k]
HEADER_BYTES_PER_TENSOR = 100  # a safetensors header's JSON per tensor besides its key: dtype, shape, offsets


# ----- tensor names: the one place that spells them ------------------------------------------------------------

def factor_name(task: str, key: str, part: str) -> str:
    """``factors/{task}/{key}/{part}`` in ``factors.safetensors``: one of a matrix's :data:`FACTOR_PARTS`."""
    return f"factors/{task}/{key}/{part}"


def non_matrix_name(task: str, key: str) -> str:
    """``non_matrix/{task}/{key}`` in ``factors.safetensors``: a task's delta of a key that is not a matrix."""
    return f"non_matrix/{task}/{key}"


def head_name(task: str, part: str) -> str:
    """``heads/{task}/weight`` (or ``bias``) in ``heads.safetensors``."""
    return f"heads/{task}/{part}"


def factor_names(task_names: Sequence[str], matrix_keys: Iterable[str], non_matrix_keys: Iterable[str]
                 ) -> list[str]:
    """Every tensor name of ``factors.safetensors`` (what :func:`save_artifact` writes and :func:`load` expects)."""
    matrix_keys, non_matrix_keys = list(matrix_keys), list(non_matrix_keys)
    names = [factor_name(task, key, part) for task in task_names for key in matrix_keys for part in FACTOR_PARTS]
    return names + [non_matrix_name(task, key) for task in task_names for key in non_matrix_keys]


def head_names(heads: Iterable[HeadEntry]) -> list[str]:
    """Every tensor name of ``heads.safetensors``: a weight per head, and a bias per linear head."""
    return [head_name(h.task, part) for h in heads for part in (("weight", "bias") if h.kind == "linear"
                                                                else ("weight",))]


def factor_header_bytes(factors: ExpertFactors) -> int:
    """A generous estimate of the safetensors header bytes of ``factors``, so that a
    build fitted to a size budget stays under it on disk: per tensor, its name and
    :data:`HEADER_BYTES_PER_TENSOR` bytes (tests/mass/test_budget.py checks it against a written file)."""
    names = factor_names(factors.task_names, factors.matrices, factors.non_matrix)
    return sum(len(name) + HEADER_BYTES_PER_TENSOR for name in names)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def shard_name(number: int, count: int) -> str:
    """The file name of shard ``number`` (from 1) of ``count``, as transformers' ``save_pretrained`` names it."""
    return f"model-{number:05d}-of-{count:05d}.safetensors"


def is_shard_name(file_name: str) -> bool:
    """Whether a plain file name is a shard's (:data:`SHARD_NAME`)."""
    return SHARD_NAME.fullmatch(file_name) is not None


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
    max_shard_bytes: int | None = Field(default=None, ge=1)  # a sharded base: the split's limit (tensor bytes)


# The adapter options an artifact may record, one optional field per declared option
# (:data:`massmerge.adapter_options.ADAPTER_OPTIONS`): a closed set (extra fields forbidden), so a hostile manifest
# cannot pass arbitrary keyword arguments to an adapter's constructor.
AdapterOptions = create_model(
    "AdapterOptions", __base__=_Strict, __module__=__name__,
    __doc__="The adapter options an artifact may record: one optional field per declared adapter option.",
    **{name: (option.annotation, None) for name, option in ADAPTER_OPTIONS.items()},
)


class ArchitectureEntry(_Strict):
    """How to rebuild the module: an adapter family over ``model/``, or a user-supplied generic module."""

    kind: Literal["adapter", "module"]
    adapter: str | None = None
    options: AdapterOptions = AdapterOptions()
    pooling: Pooling | None = None


#: What an artifact answers: ``classify`` (a task and class per input, through heads) or ``generate`` (text, from
#: a model that generates, such as T5; no heads). Artifacts written before generation existed classify.
OutputKind = Literal["classify", "generate"]
OUTPUT_KINDS: tuple[str, ...] = ("classify", "generate")
#: the HF files besides the config and weights that ``model/`` may hold for a generating model
GENERATION_FILES = ("generation_config.json",)


class Manifest(_Strict):
    format_version: int
    output: OutputKind = "classify"
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
    _directory: Path | None = PrivateAttr(default=None)  # where read_manifest read it (not part of the file)

    @property
    def matrix_keys(self) -> list[str]:
        return list(self.ranks)

    @property
    def directory(self) -> Path | None:
        """The artifact directory this manifest was read from (None for one made in memory): saving a loaded
        model again takes its tokenizer files and HF config from there."""
        return self._directory


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
        where, message, _ = first_validation_error(exc)
        raise MassMergeError(f"{path}: invalid manifest field '{where}' ({message})") from None
    check_manifest(manifest, path)
    manifest._directory = directory
    return manifest


def check_manifest(manifest: Manifest, path: Path) -> None:
    """Cross-field rules pydantic cannot state: unique task names, ranks and accepted indices per task."""
    names = manifest.task_names
    T = len(names)
    problem = task_name_problem(names)
    if problem is not None:
        raise MassMergeError(f"{path}: field 'task_names': {problem}")
    if manifest.output == "generate" and manifest.architecture.kind != "adapter":
        raise MassMergeError(f"{path}: field 'output' is 'generate', which needs an adapter architecture (model/)")
    if [h.task for h in manifest.heads] != names and not (manifest.output == "generate" and not manifest.heads):
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
                                 f"{HF_WEIGHTS} or its shards and {HF_SHARD_INDEX}, "
                                 f"{', '.join(GENERATION_FILES)} and tokenizer files)")


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
    if file_name in ("config.json", HF_WEIGHTS, HF_SHARD_INDEX, *GENERATION_FILES) or is_shard_name(file_name):
        return True
    suffix = PurePosixPath(file_name).suffix
    if suffix in (".py", ".safetensors", *PICKLE_SUFFIXES):
        return False
    return any(fnmatch.fnmatchcase(file_name, pattern) for pattern in TOKENIZER_PATTERNS)


def base_weight_files(manifest: Manifest) -> list[str]:
    """The listed files that hold the base's tensors: its one safetensors file, or a sharded base's index and
    every listed shard (what ``artifact_bytes(include_base=False)`` leaves out)."""
    if manifest.base.file is None:
        return []
    if manifest.base.file != f"{MODEL_DIR}/{HF_SHARD_INDEX}":
        return [manifest.base.file]
    return [manifest.base.file, *listed_shards(manifest)]


def listed_shards(manifest: Manifest) -> list[str]:
    """The listed files of ``model/`` named like shards (``model/model-0000i-of-0000N.safetensors``)."""
    return sorted(name for name in manifest.files
                  if name.startswith(f"{MODEL_DIR}/") and is_shard_name(name.removeprefix(f"{MODEL_DIR}/")))


def check_base_entry(manifest: Manifest, path: Path) -> None:
    """An embedded base is a listed file (for an adapter artifact, which transformers reads from ``model/``:
    ``model/model.safetensors``, or a sharded base's ``model/model.safetensors.index.json`` with its shards, never
    both, since transformers would read only one of them); a reference is only for a generic module and names an
    absolute path, bytes, sha256. The index's own content is checked by :func:`massmerge.artifact.verify.shard_map`
    once its checksum is."""
    base = manifest.base
    if base.mode == "embedded":
        adapter = manifest.architecture.kind == "adapter"
        allowed = (f"{MODEL_DIR}/{HF_WEIGHTS}", f"{MODEL_DIR}/{HF_SHARD_INDEX}") if adapter else (BASE_FILE,)
        if base.file not in allowed or base.file not in manifest.files:
            named = " or ".join(f"'{name}'" for name in allowed)
            raise MassMergeError(f"{path}: field 'base.file' must be {named}, a listed file")
        check_shard_entries(manifest, path)
        return
    if manifest.architecture.kind == "adapter":
        raise MassMergeError(f"{path}: field 'base.mode' is 'reference', but an adapter artifact must embed its "
                             f"base in {MODEL_DIR}/")
    if not base.path or not PurePosixPath(base.path).is_absolute() or not base.sha256 or base.bytes is None:
        raise MassMergeError(f"{path}: field 'base' must name the referenced file's absolute path, bytes and sha256")
    if base.max_shard_bytes is not None:
        raise MassMergeError(f"{path}: field 'base.max_shard_bytes' is only for a sharded base in {MODEL_DIR}/")


def check_shard_entries(manifest: Manifest, path: Path) -> None:
    """Shards are listed exactly when ``base.file`` is the index, and ``base.max_shard_bytes`` with them."""
    sharded = manifest.base.file == f"{MODEL_DIR}/{HF_SHARD_INDEX}"
    shards = listed_shards(manifest)
    if not sharded and shards:
        raise MassMergeError(f"{path}: field 'files' lists the shard '{shards[0]}', but 'base.file' is not "
                             f"'{MODEL_DIR}/{HF_SHARD_INDEX}'")
    if sharded and f"{MODEL_DIR}/{HF_WEIGHTS}" in manifest.files:
        raise MassMergeError(f"{path}: field 'files' lists '{MODEL_DIR}/{HF_WEIGHTS}' beside the shard index "
                             "'base.file' names (transformers would read only one of them)")
    if sharded and not shards:
        raise MassMergeError(f"{path}: field 'base.file' names the shard index, but 'files' lists no shard")
    if sharded != (manifest.base.max_shard_bytes is not None):
        raise MassMergeError(f"{path}: field 'base.max_shard_bytes' must be given exactly when the base is sharded")



__all__ = [
    "BASE_FILE",
    "FACTORS_FILE",
    "FACTOR_PARTS",
    "FORMAT_VERSION",
    "GENERATION_FILES",
    "HEADS_FILE",
    "HF_WEIGHTS",
    "MANIFEST",
    "MODEL_DIR",
    "OUTPUT_KINDS",
    "Manifest",
    "OutputKind",
    "allowed_name",
    "base_weight_files",
    "check_manifest",
    "factor_header_bytes",
    "factor_name",
    "factor_names",
    "head_name",
    "head_names",
    "is_shard_name",
    "listed_shards",
    "model_file_allowed",
    "non_matrix_name",
    "read_manifest",
    "shard_name",
]
