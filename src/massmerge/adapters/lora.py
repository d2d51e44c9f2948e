"""PEFT LoRA adapters as experts: the task vector of a LoRA expert is ``scale * B @ A`` per adapted matrix.

Why no dense matrix: MASS only needs the truncated SVD of each task vector, and ``B @ A`` has rank <= r.
With ``B = Q_b R_b`` and ``A^T = Q_a R_a`` (thin QR, r columns each), ``scale * B A = Q_b (scale R_b R_a^T)
Q_a^T``; the SVD of the small ``r x r`` core ``W S Z^T`` gives the exact SVD ``(Q_b W) S (Q_a Z)^T`` at
O((m + n) r^2) cost instead of O(m n min(m, n)).

Supported: ``lora_A``/``lora_B`` on Linear layers (``fan_in_fan_out`` transposes, as for GPT-2 Conv1D),
embedding LoRA (``lora_embedding_A/B``), ``lora_alpha / r`` or rsLoRA ``lora_alpha / sqrt(r)`` scaling with
``rank_pattern``/``alpha_pattern`` overrides. Refused with a clear error: DoRA (the magnitude vector makes the
update non-low-rank) and adapter types other than LORA. Classifier weights saved through ``modules_to_save``
are kept aside as ``head_state`` (they are heads, not encoder deltas).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from massmerge.checkpoints import load_state_dict
from massmerge.errors import CheckpointError, OptionError
from massmerge.lowrank import LowRank, rank_for, rank_fraction_for
from massmerge.mass.config import DEFAULT_EPS
from massmerge.mass.experts import ExpertFactors
from massmerge.sources import resolve_source

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PAIR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")


def lowrank_from_lora(A: torch.Tensor, B: torch.Tensor, scale: float, *, k: int | None = None,
                      transpose: bool = False, dtype: torch.dtype = torch.float32) -> LowRank:
    """Exact top-``k`` SVD of ``scale * B @ A`` (``B``: [m, r], ``A``: [r, n]) via QR, never forming the product.

    ``transpose`` returns the factors of ``(scale * B @ A)^T`` (fan_in_fan_out layers and embeddings).
    """
    a, b = A.to(dtype), B.to(dtype)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise CheckpointError(f"LoRA factors have incompatible shapes A {list(A.shape)}, B {list(B.shape)}")
    q_b, r_b = torch.linalg.qr(b)  # [m, r], [r, r]
    q_a, r_a = torch.linalg.qr(a.T)  # [n, r], [r, r]
    w, s, zt = torch.linalg.svd(scale * (r_b @ r_a.T))
    u, v = q_b @ w, q_a @ zt.T
    if transpose:
        u, v = v, u
    keep = s.shape[0] if k is None else max(1, min(int(k), s.shape[0]))
    return LowRank(u[:, :keep].contiguous(), s[:keep].contiguous(), v[:, :keep].contiguous())


def zero_lowrank(shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> LowRank:
    """A rank-1 factor with singular value 0: the task vector of a matrix a LoRA expert does not adapt."""
    m, n = shape
    u = torch.zeros(m, 1, dtype=dtype)
    v = torch.zeros(n, 1, dtype=dtype)
    u[0, 0] = 1.0
    v[0, 0] = 1.0
    return LowRank(u, torch.zeros(1, dtype=dtype), v)


@dataclass
class LoraExpert:
    """One LoRA expert read from a PEFT adapter directory, with its keys mapped onto the base model's keys."""

    path: Path
    config: dict
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = field(default_factory=dict)
    non_matrix: dict[str, torch.Tensor] = field(default_factory=dict)
    head_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def factors(self, *, rank_fraction: float | None = None, shapes: Mapping[str, tuple[int, ...]] | None = None,
                dtype: torch.dtype = torch.float32) -> dict[str, LowRank]:
        """Per base key, the LowRank of this expert's delta (rank capped by ``rank_fraction`` of the matrix)."""
        out = {}
        for key, (a, b, scale, transpose) in self.pairs.items():
            shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
            if shapes is not None and tuple(shapes[key]) != shape:
                raise CheckpointError(
                    f"{self.path}: LoRA delta for '{key}' has shape {list(shape)}, the base has {list(shapes[key])}"
                )
            k = None if rank_fraction is None else rank_for(shape, rank_fraction)
            out[key] = lowrank_from_lora(a, b, scale, k=k, transpose=transpose, dtype=dtype)
        return out

    def dense(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense delta of one matrix (for tests and for static merges that need dense task vectors)."""
        a, b, scale, transpose = self.pairs[key]
        delta = scale * (b.to(dtype) @ a.to(dtype))
        return delta.T if transpose else delta

    def task_vector(self, base: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Dense task vector over every floating key of ``base`` (zeros where the adapter changes nothing)."""
        out = {}
        for key in base:
            value = base[key]
            if not value.is_floating_point():
                continue
            if key in self.pairs:
                out[key] = self.dense(key, dtype)
            elif key in self.non_matrix:
                out[key] = self.non_matrix[key].to(dtype)
            else:
                out[key] = torch.zeros(value.shape, dtype=dtype)
        return out


def load_lora_expert(source: str | Path, base_keys: Sequence[str], base: Mapping[str, torch.Tensor] | None = None,
                     *, revision: str | None = None, trust_pickle: bool = False) -> LoraExpert:
    """Read a PEFT LoRA adapter (directory or hub id) and map its modules onto ``base_keys``.

    ``base`` (optional) is needed only for adapters that also train biases (``bias="all"/"lora_only"``): their
    saved biases are full values, turned into deltas against the base.
    """
    path = resolve_source(source, revision)
    config = read_adapter_config(path)
    state = _read_adapter_weights(path, trust_pickle=trust_pickle)
    expert = LoraExpert(path=path, config=config)
    raw_pairs: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _PAIR.match(key)
        if match:
            raw_pairs.setdefault(match["module"], {})[match["kind"]] = tensor
        else:
            extras[key] = tensor
    mapper = KeyMapper(base_keys, name=str(path))
    for module, parts in raw_pairs.items():
        _add_pair(expert, mapper, module, parts, config)
    for key, tensor in extras.items():
        _add_extra(expert, mapper, key, tensor, base)
    if not expert.pairs:
        raise CheckpointError(f"{path}: adapter holds no lora_A/lora_B weights")
    return expert


def read_adapter_config(path: Path) -> dict:
    """``adapter_config.json``, checked for what we support (LORA, no DoRA)."""
    file = path / ADAPTER_CONFIG if path.is_dir() else path.parent / ADAPTER_CONFIG
    if not file.is_file():
        raise CheckpointError(f"{path}: not a PEFT adapter (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(file.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{file}: malformed JSON ({exc})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: peft_type '{config.get('peft_type')}' is not supported (only LORA)")
    if config.get("use_dora"):
        raise CheckpointError(f"{file}: DoRA adapters are not low-rank task vectors; merge them into dense checkpoints first")
    return config


def _read_adapter_weights(path: Path, *, trust_pickle: bool) -> dict[str, torch.Tensor]:
    folder = path if path.is_dir() else path.parent
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return load_state_dict(folder / name, trust_pickle=trust_pickle)
    raise CheckpointError(f"{folder}: no adapter_model.safetensors inside")


def lora_scale(config: Mapping, module: str, rank: int) -> float:
    """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA), with PEFT's per-module rank/alpha patterns."""
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    for pattern, value in patterns.items():
        if module == pattern or re.match(rf"(.*\.)?{pattern}$", module):
            return value
    return default


def _add_pair(expert: LoraExpert, mapper: KeyMapper, module: str, parts: Mapping[str, torch.Tensor], config: Mapping) -> None:
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a = parts.get("lora_embedding_A" if embedding else "lora_A")
    b = parts.get("lora_embedding_B" if embedding else "lora_B")
    if a is None or b is None:
        raise CheckpointError(f"{expert.path}: module '{module}' has only one of lora_A / lora_B")
    key = mapper.map(_strip_peft(module) + ".weight")
    transpose = embedding or bool(config.get("fan_in_fan_out"))
    scale = lora_scale(config, _strip_peft(module), int(a.shape[0]))
    expert.pairs[key] = (a, b, scale, transpose)


def _add_extra(expert: LoraExpert, mapper: KeyMapper, key: str, tensor: torch.Tensor,
               base: Mapping[str, torch.Tensor] | None) -> None:
    name = _strip_peft(key)
    if ".modules_to_save." in name or mapper.find(name) is None:
        expert.head_state[name.replace(".modules_to_save", "")] = tensor
        return
    base_key = mapper.map(name)
    if base is None:
        raise OptionError(f"{expert.path}: adapter trains '{base_key}' fully; pass the base state dict to take its delta")
    expert.non_matrix[base_key] = tensor.float() - base[base_key].float()


def _strip_peft(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


class KeyMapper:
    """Map adapter module keys onto base keys that may differ by a leading prefix (``bert.``, ``model.``...)."""

    def __init__(self, base_keys: Iterable[str], *, name: str) -> None:
        self.keys = set(base_keys)
        self.name = name

    def find(self, key: str) -> str | None:
        """The base key equal to ``key`` up to a dotted prefix on either side, or None."""
        if key in self.keys:
            return key
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in self.keys:
                return ".".join(parts[i:])
        matches = [k for k in self.keys if k.endswith("." + key)]
        return matches[0] if len(matches) == 1 else None

    def map(self, key: str) -> str:
        found = self.find(key)
        if found is None:
            raise CheckpointError(f"{self.name}: adapter key '{key}' matches no parameter of the base model")
        return found


def lora_expert_factors(experts: Sequence[LoraExpert], shapes: Mapping[str, tuple[int, ...]], *,
                        rank_fraction: float | None = None) -> list[tuple[dict[str, LowRank], dict[str, torch.Tensor]]]:
    """Per expert, (matrix factors, non-matrix deltas) over the union of adapted keys, ready for
    ``ExpertFactors.add_task_factors``: a matrix one expert does not adapt gets a zero factor, a non-matrix
    key it does not train a zero delta, so every task has the same keys."""
    fraction = rank_fraction_for(len(experts), rank_fraction)
    matrix_keys = sorted({k for e in experts for k in e.pairs})
    other_keys = sorted({k for e in experts for k in e.non_matrix})
    out = []
    for expert in experts:
        factors = expert.factors(rank_fraction=fraction, shapes=shapes)
        for key in matrix_keys:
            factors.setdefault(key, zero_lowrank((int(shapes[key][0]), int(shapes[key][1]))))
        others = {k: expert.non_matrix.get(k, torch.zeros(shapes[k])) for k in other_keys}
        out.append((factors, others))
    return out


def build_lora_factors(experts: Sequence[LoraExpert], task_names: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
                       *, rank_fraction: float | None = None, eps: float | None = DEFAULT_EPS):  # noqa: ANN201
    """An :class:`~massmerge.mass.ExpertFactors` built from LoRA experts without any dense task vector."""
    if len(experts) != len(task_names):
        raise OptionError(f"--task-names: {len(task_names)} names for {len(experts)} LoRA experts")
    if len(experts) < 2:
        raise OptionError(f"--experts: MASS needs at least 2 experts, got {len(experts)}")
    fraction = rank_fraction_for(len(experts), rank_fraction)
    factors = ExpertFactors(task_names=list(task_names), rank_fraction=fraction)
    for matrices, others in lora_expert_factors(experts, shapes, rank_fraction=fraction):
        factors.add_task_factors(matrices, others)
    factors.apply_deredundancy(eps)
    return factors
