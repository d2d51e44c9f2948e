"""SMILE: the sparse mixture of low-rank experts of Tang et al. (2024), training-free, as FusionBench builds it.

Every ``nn.Linear`` whose experts differ from the base becomes a :class:`SmileLinear`: the base's own layer
(the shared part) plus, per token, the ``top_k`` experts a gate picks, each a rank-``k`` reconstruction of its
task's weight delta (and its bias delta):

    y = W_0 x + b_0 + sum_{e in top_k(x)} w_e(x) (U_e diag(s_e) V_e^T x + b_e - b_0)

The gate reads the token itself: ``r_e(x) = || V_e,g^T x ||`` with ``V_e,g`` the top ``gate_k`` right singular
vectors of expert e's delta; ``w = softmax(r)`` over the experts, cut to the ``top_k`` largest and renormalized.
Every other parameter (embeddings, norms, biases of layers no expert changed) stays the base's (FusionBench's
``average_experts: false``). Per token and per layer, unlike MASS, which routes once per input.

Any model whose matrices are ``nn.Linear`` works, as FusionBench's upscaling does: encoders (CLIP, BERT) and
``T5ForConditionalGeneration`` alike (encoder, decoder and the LM head; T5's shared embedding, relative-attention
biases and norms stay the base's). Each token routes on its own, so HF ``generate()`` runs the upscaled model as
is (every decode step routes the new token). A LM head tied to the embedding is upscaled when the task vectors
hold the embedding (found by tensor identity). The SVDs run on the base layer's device.

Defaults (:class:`SmileSettings`): ``top_k = 2`` (the paper's SMILE-2 row) and ``k = gate_k =`` MASS's rank rule
``floor(min(m, n) / T)``, so SMILE and MASS keep the same number of directions per task and matrix (about the
same storage); each is an option. FusionBench's own config uses ``k = 128, gate_k = 1, top_k = 1``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from massmerge.errors import OptionError
from massmerge.lowrank import rank_for, rank_fraction_for, truncated_svd
from massmerge.progress import track


class SmileSettings(BaseModel):
    """How SMILE is built: ranks of the experts and of the gate (None: MASS's rank rule), experts per token."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    k: int | None = Field(default=None, ge=1, description="rank of each expert; None = floor(min(m, n) / T)")
    gate_k: int | None = Field(default=None, ge=1, description="gate directions per expert; None = k")
    top_k: int = Field(default=2, ge=1, description="experts per token (SMILE-2)")


class SmileLinear(nn.Module):
    """A base ``nn.Linear`` plus T rank-k experts and the per-token gate (module docstring)."""

    def __init__(self, base: nn.Linear, weight_deltas: Sequence[torch.Tensor], bias_deltas: Sequence[torch.Tensor | None],
                 *, k: int, gate_k: int, top_k: int) -> None:
        super().__init__()
        if top_k > len(weight_deltas):
            raise OptionError(f"SMILE: top_k {top_k} is more than the {len(weight_deltas)} experts")
        self.base = base
        self.top_k = top_k
        # the SVDs run where the base layer lives (a GPU's are FusionBench's `upscaling_accelerator`)
        device, dtype = base.weight.device, base.weight.dtype
        us, svs, gates, biases = [], [], [], []
        for delta, bias in zip(weight_deltas, bias_deltas):
            factor = truncated_svd(delta.to(device=device, dtype=torch.float32), max(k, gate_k), method="exact")
            keep = min(k, factor.rank)
            us.append(_pad(factor.U[:, :keep], k))
            svs.append(_pad((factor.V[:, :keep] * factor.s[:keep]), k))  # (s V^T)^T: [n, k]
            gates.append(_pad(factor.V[:, :min(gate_k, factor.rank)], gate_k))
            biases.append(torch.zeros(base.out_features, device=device) if bias is None
                          else bias.to(device=device, dtype=torch.float32))
        self.k, self.gate_k = k, gate_k
        # every expert side by side: [m, T * k] and [n, T * k], so all of them run as two matmuls (below)
        self.register_buffer("U_all", torch.cat(us, dim=1).to(dtype))
        self.register_buffer("SV_all", torch.cat(svs, dim=1).to(dtype))
        self.register_buffer("gate", torch.cat(gates, dim=1).T.contiguous().to(dtype))  # [T * gate_k, n]
        self.register_buffer("bias_deltas", torch.stack(biases).to(dtype))  # [T, m]

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: HF modules read ``layer.weight.dtype`` (T5's FFN casts its input to ``wo``'s),
        as they would of the ``nn.Linear`` this replaces (FusionBench's ``SmileMoELinear`` does the same)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (see :attr:`weight`)."""
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def num_experts(self) -> int:
        return int(self.bias_deltas.shape[0])

    @property
    def U(self) -> torch.Tensor:
        """Each expert's left factor, [T, m, k] (a view)."""
        return self.U_all.view(self.U_all.shape[0], self.num_experts, self.k).permute(1, 0, 2)

    @property
    def SV(self) -> torch.Tensor:
        """Each expert's ``(diag(s) V^T)^T``, [T, n, k] (a view)."""
        return self.SV_all.view(self.SV_all.shape[0], self.num_experts, self.k).permute(1, 0, 2)

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [N, top_k], experts [N, top_k]) of tokens ``x`` [N, n]."""
        logits = F.linear(x, self.gate).view(x.shape[0], self.num_experts, self.gate_k).norm(dim=2)
        weights, experts = torch.softmax(logits, dim=1).topk(self.top_k, dim=1)
        return weights / weights.sum(dim=1, keepdim=True), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every token through its top-k experts. Unpicked experts get weight 0, so running all T rank-k experts
        as two matmuls of width T * k (about min(m, n): two base layers' work) equals FusionBench's gather per
        expert, without a Python loop over experts."""
        out = self.base(x)
        tokens = x.reshape(-1, x.shape[-1])
        weights, experts = self.routing(tokens)
        mix = torch.zeros(tokens.shape[0], self.num_experts, dtype=weights.dtype, device=weights.device)
        mix.scatter_(1, experts, weights)  # [N, T]: the renormalized weight of each picked expert, else 0
        inner = (tokens @ self.SV_all).view(tokens.shape[0], self.num_experts, self.k) * mix[..., None]
        extra = inner.reshape(tokens.shape[0], -1) @ self.U_all.T + mix @ self.bias_deltas
        return out + extra.view(out.shape).to(out.dtype)

    def stored_numel(self) -> int:
        """Numbers SMILE keeps beyond the base layer: experts, gate and bias deltas."""
        return self.U_all.numel() + self.SV_all.numel() + self.gate.numel() + self.bias_deltas.numel()


def _pad(columns: torch.Tensor, width: int) -> torch.Tensor:
    """``columns`` [d, r] widened to ``width`` with zero columns (an expert whose delta has rank < width)."""
    return columns if columns.shape[1] == width else F.pad(columns, (0, width - columns.shape[1]))


def build_smile(base_model: nn.Module, task_vectors: Iterable[Mapping[str, torch.Tensor]],
                settings: SmileSettings | None = None) -> nn.Module:
    """A copy of ``base_model`` with every ``nn.Linear`` whose experts differ from the base turned into a
    :class:`SmileLinear` (FusionBench's ``SmileUpscalingAlgorithm`` with ``routing_use_diff``); the task vectors
    are read one at a time per layer (each a mapping over the base's keys)."""
    settings = settings or SmileSettings()
    vectors = list(task_vectors)
    fraction = rank_fraction_for(len(vectors), None)
    model = copy.deepcopy(base_model).eval()
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    names = _tensor_names(model)
    held = set.intersection(*(set(iter(tv)) for tv in vectors)) if vectors else set()  # iter: no tensor is read
    for name, module in track(linears, "building SMILE"):
        candidates = names.get(id(module.weight), [f"{name}.weight"])
        key = next((n for n in candidates if n in held), None)
        if key is None:
            continue
        deltas = [tv[key] for tv in vectors]
        if all(not bool(d.any()) for d in deltas):  # no expert changed this layer: it stays the base's
            continue
        k = settings.k or rank_for(tuple(module.weight.shape), fraction)
        bias_key = f"{name}.bias" if module.bias is not None and f"{name}.bias" in held else None
        biases = [None if bias_key is None else tv[bias_key] for tv in vectors]
        smile = SmileLinear(plain_linear(module), deltas, biases, k=k, gate_k=settings.gate_k or k,
                            top_k=settings.top_k)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, smile)
    return model


def _tensor_names(model: nn.Module) -> dict[int, list[str]]:
    """Every state-dict name of each tensor, by identity: a tied weight (T5's LM head tied to ``shared.weight``)
    is found under whichever name the task vectors hold it, as FusionBench reads it through the module."""
    names: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        names.setdefault(id(value), []).append(key)
    return names


def plain_linear(module: nn.Linear) -> nn.Linear:
    """An ``nn.Linear`` sharing ``module``'s parameters (a subclass, e.g. a MASS-routed one, becomes plain)."""
    if type(module) is nn.Linear:
        return module
    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    plain.weight = module.weight
    plain.bias = module.bias
    return plain


def storage_factor(model: nn.Module, base_model: nn.Module) -> float:
    """SMILE's stored numbers over the base's (the base plus every expert, gate and bias delta)."""
    base = sum(p.numel() for p in base_model.state_dict().values() if p.is_floating_point())
    extra = sum(m.stored_numel() for m in model.modules() if isinstance(m, SmileLinear))
    return (base + extra) / base


__all__ = ["SmileLinear", "SmileSettings", "build_smile", "storage_factor"]
