"""What MASS needs to know about a model family, and the shared machinery behind every adapter.

MASS is family-agnostic math, but three facts depend on the architecture: which ``nn.Linear`` is the routing
matrix (design.md section 2.5: the first MLP matrix of block ``round(0.75 * depth)``), how to turn that layer's
input activation into one vector per sample (the CLS token *by the model's real layout*, or the mean over
non-padding tokens), and how to run the model to its final features. An :class:`Adapter` answers those three
questions, plus how to load a model and its weights from a user's files.

Why the layout is explicit: taking ``x[0]`` as the CLS token silently takes the *first sample* of a batch-first
tensor (design.md section 4). Every adapter states ``layout`` ("batch_first" ``[B, L, D]`` or "seq_first"
``[L, B, D]``) and :func:`~massmerge.mass.pooling.pool_tokens` checks the activation's shape against the batch size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from massmerge.adapters.families import FAMILIES, model_type_of
from massmerge.adapters.weights import AlignedCheckpoint, open_weights
from massmerge.errors import OptionError
from massmerge.mass.config import Pooling, check_pooling, default_routing_block
from massmerge.mass.pooling import Layout, pool_tokens
from massmerge.mass.routed import plain_class
from massmerge.sources import resolve_source

Batch = Mapping[str, Any] | torch.Tensor

# Substrings that mark a module as part of a block's MLP in the families we know; used by the generic fallback.
MLP_HINTS = ("mlp", "intermediate", "densereludense", "ffn", "feed_forward", "c_fc", "fc1", "wi")


@runtime_checkable
class Adapter(Protocol):
    """The contract of a model family, as the build, load, suite and evaluate code use it (every method below has a
    caller); :class:`BaseAdapter` implements it and each family fills in loading and features."""

    name: str
    pooling: Pooling  # the routing pooling this adapter was made with
    paper_pooling: Pooling  # the paper's pooling for the family (``--router paper``)

    def bind(self, model: nn.Module) -> Adapter:
        """Learn model-specific facts (the token layout, the family row); returns ``self``."""
        ...

    def routing_layer(self, model: nn.Module) -> str:
        """Dotted module name of the routing ``nn.Linear`` (its input is MASS's ``z``)."""
        ...

    def block_routing_layer(self, model: nn.Module, index: int) -> str:
        """The routing matrix of block ``index``."""
        ...

    def block_of(self, model: nn.Module, layer: str) -> int:
        """The index of the block that holds module ``layer``."""
        ...

    def block_names(self, model: nn.Module) -> list[str]:
        """The transformer blocks' module names in forward order (``restart_block`` counts them)."""
        ...

    def evidence_layers(self, model: nn.Module, layer: str) -> tuple[str, ...]:
        """The linear layers the first pass computes up to ``layer``, ``layer`` last."""
        ...

    def default_router(self, model: nn.Module, layer: str | None = None) -> dict[str, Any]:
        """The serve settings the family routes with by default."""
        ...

    def pool(self, activation: torch.Tensor, batch: Batch, pooling: str | None = None) -> Any:
        """Turn the routing layer's input activation into ``[B, d]`` (``pooling`` overrides the default)."""
        ...

    def features(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Run ``model`` on ``batch`` to the final features ``[B, d]`` that the heads consume."""
        ...

    def feature_dim(self, model: nn.Module) -> int | None:
        """Width of the final features (None when the family cannot tell without a forward)."""
        ...

    def encoder_keys(self, model: nn.Module) -> list[str]:
        """State-dict keys of the part of ``model`` that is merged, each tied tensor once."""
        ...

    def load_model(self, source: str, *, revision: str | None = None, trust_pickle: bool = False) -> nn.Module:
        """Build the family's encoder from a local path or hub id (the architecture, with the base weights)."""
        ...

    def load_weights(self, source: str, model: nn.Module, *, revision: str | None = None,
                     trust_pickle: bool = False) -> AlignedCheckpoint:
        """A checkpoint viewed lazily under ``model``'s encoder keys."""
        ...

    def describe(self) -> dict[str, Any]:
        """Settings for reports and cache keys."""
        ...


class BaseAdapter:
    """Shared logic: block discovery, routing-layer choice and override, pooling; families fill in the rest.

    Subclasses set ``block_suffixes`` (names of the ``nn.ModuleList`` of transformer blocks, e.g.
    ``encoder.layers``), ``mlp_names`` (the first MLP linear inside a block, in order of preference),
    ``default_pooling`` and ``layout``.

    The default router of a family (:meth:`default_router`) is the paper's rule (one routing layer, the
    family's ``paper_pooling``) unless the family sets ``multi_layer_default``: then it routes on every layer
    the first pass computes before it stops (:meth:`evidence_layers`), their log-likelihoods added
    (``layer_combine='ppca'``), with ``default_pooling``. Text sets it: the router ablation on the offline
    suite's validation splits chose it (docs/SUITE.md); vision keeps the paper's rule until an ablation on
    image experts earns the change.
    """

    name: ClassVar[str] = "base"
    block_suffixes: ClassVar[tuple[str, ...]] = ()
    block_exclude: ClassVar[tuple[str, ...]] = ()
    mlp_names: ClassVar[tuple[str, ...]] = ()
    default_pooling: ClassVar[Pooling] = "cls"
    paper_pooling: ClassVar[Pooling] = "cls"
    multi_layer_default: ClassVar[bool] = False

    def __init__(self, *, routing_layer: str | int | None = None, pooling: Pooling | None = None,
                 special_ids: list[int] | tuple[int, ...] | None = None) -> None:
        check_pooling(pooling)
        self.routing_override = routing_layer
        self.pooling: Pooling = pooling or self.default_pooling
        self.layout: Layout = "batch_first"
        self.special_ids = None if special_ids is None else tuple(int(i) for i in special_ids)

    # -- blocks and routing layer ------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """The dotted name and the ``nn.ModuleList`` of the encoder's transformer blocks."""
        found = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList)
            and any(name == s or name.endswith("." + s) for s in self.block_suffixes)
            and not any(x in name for x in self.block_exclude)
        ]
        if not found:
            raise OptionError(
                f"routing_layer: no block list named {' or '.join(self.block_suffixes)} in this "
                f"{type(model).__name__}; pass routing_layer=<dotted nn.Linear name>"
            )
        return max(found, key=lambda item: len(item[1]))

    def mlp_linear(self, block: nn.Module) -> str:
        """Relative name of the first MLP ``nn.Linear`` of one block (family names first, then a generic rule)."""
        modules = dict(block.named_modules())
        for name in self.mlp_names:
            if isinstance(modules.get(name), nn.Linear):
                return name
        for name, module in modules.items():
            if isinstance(module, nn.Linear) and any(h in name.lower() for h in MLP_HINTS):
                if module.out_features > module.in_features:
                    return name
        raise OptionError(f"routing_layer: no MLP nn.Linear found in block {type(block).__name__}; pass it by name")

    def routing_layer(self, model: nn.Module) -> str:
        """The routing matrix's module name: the override if given (name or block index), else the default block."""
        if isinstance(self.routing_override, str):
            return check_linear(model, self.routing_override)
        prefix, blocks = self.blocks(model)
        index = default_routing_block(len(blocks)) if self.routing_override is None else int(self.routing_override)
        return self.block_routing_layer(model, index)

    def block_routing_layer(self, model: nn.Module, index: int) -> str:
        """The routing matrix of block ``index`` (its first MLP matrix)."""
        prefix, blocks = self.blocks(model)
        if not -len(blocks) <= index < len(blocks):
            raise OptionError(f"routing_layer: block {index} out of range, the model has {len(blocks)} blocks")
        index %= len(blocks)
        return f"{prefix}.{index}.{self.mlp_linear(blocks[index])}"

    def block_of(self, model: nn.Module, layer: str) -> int:
        """The index of the block that holds module ``layer``."""
        names = self.block_names(model)
        found = next((i for i, name in enumerate(names) if layer.startswith(name + ".")), None)
        if found is None:
            raise OptionError(f"routing_layer: '{layer}' is in none of the model's blocks")
        return found

    def evidence_layers(self, model: nn.Module, layer: str) -> tuple[str, ...]:
        """Every plain ``nn.Linear`` of the blocks up to the routing layer's block that is registered before it,
        then the routing layer itself: the inputs the first pass computes anyway before it stops there.

        Registration order is the order the layers run in (HF BERT, CLIP, T5 and ViT blocks alike); the tuple
        ends with ``layer``, the paper's routing layer (the one ``--router paper`` keeps). A layer outside the
        blocks routes alone.
        """
        prefix, blocks = self.blocks(model)
        inside = layer.startswith(prefix + ".") and layer[len(prefix) + 1:].split(".")[0].isdigit()
        if not inside:
            return (layer,)
        last = int(layer[len(prefix) + 1:].split(".")[0])
        found: list[str] = []
        for index in range(last + 1):
            for name, module in blocks[index].named_modules():
                full = f"{prefix}.{index}.{name}"
                if full == layer:
                    return (*found, layer)
                if name and plain_class(module) is nn.Linear:
                    found.append(full)
        return (*found, layer)

    def default_router(self, model: nn.Module, layer: str | None = None) -> dict[str, Any]:
        """The serve settings this family routes with by default (see the class docstring), exiting at ``layer``
        (default: the family's routing layer)."""
        layer = layer or self.routing_layer(model)
        if not self.multi_layer_default:
            return {"routing_layers": (layer,), "pooling": self.pooling, "layer_combine": "standardized"}
        return {"routing_layers": self.evidence_layers(model, layer), "pooling": self.pooling, "layer_combine": "ppca"}

    def block_names(self, model: nn.Module) -> list[str]:
        """The transformer blocks' module names in forward order (what ``restart_block`` counts)."""
        prefix, blocks = self.blocks(model)
        return [f"{prefix}.{index}" for index in range(len(blocks))]

    # -- pooling -------------------------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> BaseAdapter:
        """Learn model-specific facts from the built model: its family row (where the blocks and the routing
        matrix are: :mod:`massmerge.adapters.families`); families add theirs (e.g. the token layout)."""
        row = FAMILIES.get(model_type_of(model) or "")
        if row is not None and row.adapter == self.name:
            self.block_suffixes, self.mlp_names = row.blocks, row.routing
        return self

    def pool(self, activation: torch.Tensor, batch: Batch, pooling: str | None = None) -> torch.Tensor:
        """Routing vector ``z [B, d]`` from the routing layer's input, by this adapter's layout and pooling
        (``pooling`` overrides the adapter's own, e.g. at serve time)."""
        return pool_tokens(activation, batch, layout=self.layout, pooling=pooling or self.pooling,
                           special_ids=self.special_ids)

    def feature_dim(self, model: nn.Module) -> int | None:
        """Width of the final features the heads read (None when the family cannot tell without a forward)."""
        return None

    # -- weights -----------------------------------------------------------------------------------------
    def encoder_keys(self, model: nn.Module) -> list[str]:
        """State-dict keys of the part of ``model`` that is merged (all of them unless a family says otherwise),
        each tied tensor once (:func:`untied_keys`)."""
        return untied_keys(model)

    def load_weights(
        self, source: str, model: nn.Module, *, revision: str | None = None, trust_pickle: bool = False
    ) -> AlignedCheckpoint:
        """A checkpoint (local path or hub id) viewed lazily under ``model``'s encoder keys.

        Safetensors are read one tensor at a time; pickle files only with ``trust_pickle``.
        """
        path = resolve_source(source, revision)
        return AlignedCheckpoint(open_weights(path, trust_pickle=trust_pickle), self.encoder_keys(model), name=str(path))

    def describe(self) -> dict[str, Any]:
        """Settings for reports and cache keys."""
        return {"adapter": self.name, "routing_layer": self.routing_override, "pooling": self.pooling, "layout": self.layout}


def untied_keys(model: nn.Module) -> list[str]:
    """``model``'s state-dict keys with each tied tensor once, under its first name.

    Why: a tied tensor is one set of weights with two names (T5's ``shared.weight`` is also
    ``encoder.embed_tokens.weight``), and ``save_pretrained`` writes it once, under the first; asking a
    checkpoint for the alias would fail, and merging both names would merge the same weights twice.
    """
    seen: set[int] = set()
    keys = []
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            keys.append(key)
    return keys


def check_linear(model: nn.Module, name: str) -> str:
    """Validate that ``name`` is an ``nn.Linear`` of ``model``; the error lists nearby candidates."""
    modules = dict(model.named_modules())
    if isinstance(modules.get(name), nn.Linear):
        return name
    candidates = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    hint = ", ".join(candidates[:3]) + (", ..." if len(candidates) > 3 else "")
    what = "is not an nn.Linear" if name in modules else "is not a module of this model"
    raise OptionError(f"routing_layer: '{name}' {what} (nn.Linear modules: {hint})")


def capture_input(model: nn.Module, layer: str, run: Any) -> torch.Tensor:
    """Run ``run()`` and return the input tensor that reached module ``layer`` (for tests and diagnostics)."""
    module = dict(model.named_modules())[layer]
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    try:
        run()
    finally:
        handle.remove()
    if not seen:
        raise OptionError(f"routing_layer: '{layer}' was not called by the forward pass")
    return seen[0]


