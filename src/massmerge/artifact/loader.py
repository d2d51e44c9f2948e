"""Load a MASS artifact as the one serving engine, every read confined to it and checked before any forward.

:func:`load` reads the manifest (:mod:`.manifest`), checks confinement and checksums (:mod:`.verify`), rebuilds
the module (an adapter family from ``model/``, or a generic module the caller passes), then checks every tensor
of the factors, heads and base files against the manifest and the model's parameters before it builds the
:class:`~massmerge.mass.MASSModel`. Serve settings come from the manifest and may be overridden per call.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from massmerge.adapters import get_adapter
from massmerge.adapters.weights import refuse_remote_code
from massmerge.artifact.manifest import (
    BASE_FILE,
    FACTORS_FILE,
    HEADS_FILE,
    MANIFEST,
    MODEL_DIR,
    Manifest,
    factor_name,
    factor_names,
    head_name,
    head_names,
    non_matrix_name,
    read_manifest,
)
from massmerge.artifact.verify import shard_map, verify_files
from massmerge.checkpoints import HF_SHARD_INDEX, all_finite, check_finite
from massmerge.errors import MassMergeError, OptionError
from massmerge.heads.modules import LinearHead, ZeroShotHead
from massmerge.io.tensors import read_safetensors
from massmerge.lowrank import LowRank
from massmerge.mass.config import ServeSettings, apply_profile
from massmerge.mass.experts import ExpertFactors
from massmerge.mass.model import MASSModel, Strategy, default_features
from massmerge.mass.pooling import PoolFn, identity_pool
from massmerge.progress import quiet_third_party


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
    expected = factor_names(manifest.task_names, manifest.ranks, manifest.non_matrix_keys)
    tensors, _ = read_safetensors(path, expected=expected)
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
        matrices[key] = [LowRank(_need(tensors, factor_name(task, key, "U"), path, (m, k)),
                                 _need(tensors, factor_name(task, key, "s"), path, (k,)),
                                 _need(tensors, factor_name(task, key, "V"), path, (n, k)))
                         for task, k in zip(manifest.task_names, ranks)]
    non_matrix = {key: [_need(tensors, non_matrix_name(task, key), path, shapes[key]) for task in manifest.task_names]
                  for key in manifest.non_matrix_keys}
    accepted = {key: manifest.accepted.get(key, list(range(len(manifest.task_names)))) for key in manifest.ranks}
    return ExpertFactors(task_names=list(manifest.task_names), rank_fraction=manifest.rank_fraction,
                         matrices=matrices, non_matrix=non_matrix, accepted=accepted, eps=manifest.build.eps)


def load_heads(directory: Path, manifest: Manifest, feature_dim: int | None) -> list[nn.Module]:
    """The heads, with their stored weights exactly (a zero-shot head's weight is not re-normalized), each
    checked: rows = num_classes, width = the model's feature size (or the other heads' width)."""
    path = directory / HEADS_FILE
    tensors, _ = read_safetensors(path, expected=head_names(manifest.heads))
    heads: list[nn.Module] = []
    width = feature_dim
    for entry in manifest.heads:
        weight = _need(tensors, head_name(entry.task, "weight"), path)
        if weight.ndim != 2 or weight.shape[0] != entry.num_classes:
            raise MassMergeError(f"{path}: tensor '{head_name(entry.task, 'weight')}' has shape {list(weight.shape)}; "
                                 f"the manifest says {entry.num_classes} classes")
        width = width or int(weight.shape[1])
        if weight.shape[1] != width:
            raise MassMergeError(f"{path}: tensor '{head_name(entry.task, 'weight')}' is {weight.shape[1]} wide; the "
                                 f"model's features are {width} wide")
        if entry.kind == "zero_shot":
            head: nn.Module = ZeroShotHead(weight, float(entry.logit_scale))  # type: ignore[arg-type]
            head.weight.copy_(weight)
        else:
            bias_key = head_name(entry.task, "bias")
            bias = _need(tensors, bias_key, path, (entry.num_classes,)) if bias_key in tensors else None
            head = LinearHead(weight, bias)
        heads.append(head)
    return heads


def _base_state(directory: Path, manifest: Manifest) -> tuple[Path, dict[str, torch.Tensor]]:
    """(file, tensors) of the base: the embedded file, a sharded base's shards (each holding exactly the tensors
    its index puts there), or the verified reference; every value finite."""
    path = Path(manifest.base.path or "") if manifest.base.mode == "reference" else directory / (manifest.base.file or BASE_FILE)
    if manifest.base.file == f"{MODEL_DIR}/{HF_SHARD_INDEX}":
        return path, _sharded_state(directory, manifest)
    state, _ = read_safetensors(path)
    check_finite(state, name=str(path))
    return path, state


def _sharded_state(directory: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, keys in shard_map(directory, manifest).items():
        shard = directory / MODEL_DIR / name
        tensors, _ = read_safetensors(shard, expected=keys)
        missing = [key for key in keys if key not in tensors]
        if missing:
            raise MassMergeError(f"{shard}: tensor '{missing[0]}' is missing (the index puts it in this shard)")
        check_finite(tensors, name=str(shard))
        state.update(tensors)
    return state


def load(
    directory: str | os.PathLike[str],
    *,
    base_model: nn.Module | None = None,
    pool: PoolFn | None = None,
    features: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    verify: bool = True,
    strategy: Strategy = "auto",
    router: str | None = None,
    device: torch.device | str | None = None,
    blocks: Sequence[str] | None = None,
    **serve: Any,
) -> MASSModel:
    """Load an artifact as a :class:`~massmerge.mass.MASSModel`; keyword arguments override serve settings.

    ``serve`` keys are :class:`~massmerge.mass.config.ServeSettings` fields (``eta=0.1``, ``top_k=1``,
    ``head_rule='posterior'``, ``routing_layers=(...)``, ``pooling='content'``, ``dtype='float16'``, ...);
    ``device`` places the model (default: the CPU, where it was read; a generic ``base_model`` is moved in
    place); ``blocks`` names a generic module's transformer blocks (``restart_block``; an adapter knows its own);
    ``router='paper'``
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
                      features=features or default_features, strategy=strategy,
                      class_names=[entry.class_names for entry in manifest.heads], device=device,
                      blocks=blocks if blocks is not None else (adapter.block_names(module) if adapter else None))
    model.manifest, model.adapter = manifest, adapter
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



__all__ = ["check_routing_layers", "load", "load_factors", "load_heads", "serve_settings"]
