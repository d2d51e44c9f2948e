"""Routed modules: how one forward of the base model runs with per-sample MASS weights, thread-safely.

:func:`install` is called once per model. Every module that owns a factored parameter becomes *routed*, in
place (its class is swapped; parameters, state-dict names and object identity stay): exact ``nn.Linear``,
``nn.Embedding`` and ``nn.LayerNorm`` become :class:`RoutedLinear`, :class:`RoutedEmbedding`,
:class:`RoutedLayerNorm`; any other owner (a conv patch embedding, a module holding a class token, an attention
block reading its ``in_proj_weight`` directly) gets a generic routed subclass. With no MASS pass active a routed
module computes exactly what the base module computes.

A pass is *active* for one call through :data:`ACTIVE`, a ``ContextVar``: each thread (and task) sees only
its own pass, so two threads may run the same model at once, and no ``forward`` is ever rebound per call. What
a routed module does while a pass is active is the pass's: :class:`~massmerge.mass.first_pass.FirstPass`
(first-pass weights, capture the routing inputs, stop) and :class:`~massmerge.mass.second_pass.SecondPass`
(each task set's merged weights on its own rows).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from massmerge.mass.batch import Unbatchable


class StopForward(Exception):
    """Raised inside the first pass once every routing layer's input is captured."""


# ----- routed module classes ----------------------------------------------------------------------------------

class RoutedLinear(nn.Linear):
    """An ``nn.Linear`` the active MASS pass can run per sample (the plain Linear when none is active)."""

    mass_name: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = ACTIVE.get()
        return F.linear(x, self.weight, self.bias) if active is None else active.linear(self, x)


class RoutedEmbedding(nn.Embedding):
    """An ``nn.Embedding`` the active MASS pass can run per sample."""

    mass_name: str

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        active = ACTIVE.get()
        return super().forward(ids) if active is None else active.embedding(self, ids)


class RoutedLayerNorm(nn.LayerNorm):
    """An ``nn.LayerNorm`` the active MASS pass can run per sample."""

    mass_name: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = ACTIVE.get()
        return super().forward(x) if active is None else active.layer_norm(self, x)


class RoutedGeneric:
    """Mixin of the generic routed subclasses (made per owner class by :func:`generic_class`)."""

    mass_name: str
    mass_plain: type[nn.Module]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        active = ACTIVE.get()
        if active is None:
            return self.mass_plain.forward(self, *args, **kwargs)  # type: ignore[arg-type]
        return active.generic(self, args, kwargs)


class RoutedScaleNorm(RoutedGeneric):
    """Mixin of a scale-only norm, ``weight * normalize(x)`` (T5's ``T5LayerNorm``, Llama's ``RMSNorm``): the pass
    normalizes once and scales each row by its set's weight (:data:`SCALE_NORMS` names the classes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        active = ACTIVE.get()
        if active is None:
            return self.mass_plain.forward(self, x)  # type: ignore[arg-type]
        return active.scale_norm(self, x)


class RoutedRelativeBias:
    """Mixin of an attention module with a relative position bias table (T5's ``compute_bias``): the table is
    indexed by positions, with no batch, so the pass computes each set's bias and gathers it per row."""

    mass_bias_plain: type[nn.Module]

    def compute_bias(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = ACTIVE.get()
        if active is None:
            return self.mass_bias_plain.compute_bias(self, *args, **kwargs)  # type: ignore[attr-defined]
        return active.relative_bias(self, args, kwargs)


def plain_compute_bias(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The relative-bias owner's own ``compute_bias``."""
    return module.mass_bias_plain.compute_bias(module, *args, **kwargs)  # type: ignore[attr-defined]


class RoutedBlock:
    """Mixin of a transformer block the active pass may skip (made per block class by :func:`block_class`): a
    second pass that restarts at block j returns the first pass's output of block j - 1 from every block before
    j instead of computing it (``restart_block``)."""

    mass_block_index: int
    mass_block_plain: type[nn.Module]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        active = ACTIVE.get()
        if active is None:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        return active.block(self, args, kwargs)


def run_block(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A routed block's own forward (whatever routed class it had before it became a block)."""
    return super(RoutedBlock, module).forward(*args, **kwargs)  # type: ignore[misc]


ROUTED_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: RoutedLinear, nn.Embedding: RoutedEmbedding, nn.LayerNorm: RoutedLayerNorm,
}
_GENERIC_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def generic_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The routed subclass of an owner class that has no dedicated routed type (cached per class)."""
    if cls not in _GENERIC_CLASSES:
        _GENERIC_CLASSES[cls] = type(f"Routed{cls.__name__}", (RoutedGeneric, cls), {"mass_plain": cls})
    return _GENERIC_CLASSES[cls]


_BLOCK_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}
_NORM_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}
_BIAS_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}
SCALE_NORMS: set[str] = set()  # class names of scale-only norms; a family row adds its own (register_scale_norm)
RELATIVE_BIAS_TABLE = "relative_attention_bias"  # the child Embedding of a T5-style attention's compute_bias


def register_scale_norm(class_name: str) -> None:
    """Declare ``class_name`` a scale-only norm (``weight * normalize(x)``, weight its only parameter): it gets
    the :class:`RoutedScaleNorm` kernel. Without it such a norm takes the generic path (exact, one copy per set)."""
    SCALE_NORMS.add(class_name)


def scale_norm_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The routed subclass of a scale-only norm class (cached per class)."""
    if cls not in _NORM_CLASSES:
        _NORM_CLASSES[cls] = type(f"Routed{cls.__name__}", (RoutedScaleNorm, cls), {"mass_plain": cls})
    return _NORM_CLASSES[cls]


def relative_bias_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The routed subclass of a relative-bias owner class (cached per class)."""
    if cls not in _BIAS_CLASSES:
        _BIAS_CLASSES[cls] = type(f"Routed{cls.__name__}", (RoutedRelativeBias, cls), {"mass_bias_plain": cls})
    return _BIAS_CLASSES[cls]


def block_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The skippable subclass of a block class (cached per class; ``cls`` may itself be a routed class)."""
    if cls not in _BLOCK_CLASSES:
        _BLOCK_CLASSES[cls] = type(f"Block{cls.__name__}", (RoutedBlock, cls), {"mass_block_plain": cls})
    return _BLOCK_CLASSES[cls]


def plain_class(module: nn.Module) -> type[nn.Module]:
    """The module's class before :func:`install` swapped it."""
    cls = type(module)
    if issubclass(cls, RoutedBlock):
        cls = cls.mass_block_plain
    if issubclass(cls, RoutedRelativeBias):
        cls = cls.mass_bias_plain
    if issubclass(cls, RoutedGeneric):
        return cls.mass_plain
    for plain, routed in ROUTED_TYPES.items():
        if cls is routed:
            return plain
    return cls


def split_key(key: str) -> tuple[str, str]:
    """``'encoder.layer.0.attention.self.query.weight'`` -> (owner module name, parameter name)."""
    owner, _, name = key.rpartition(".")
    return owner, name


def is_routed_kind(module: nn.Module, name: str) -> bool:
    """Whether the parameter ``name`` of ``module`` is applied by a dedicated routed type (else: generic)."""
    cls = plain_class(module)
    if cls is nn.Linear:
        return name in ("weight", "bias")
    if cls is nn.Embedding:
        return name == "weight" and module.max_norm is None
    if cls is nn.LayerNorm:
        return name in ("weight", "bias")
    return False


@dataclass(frozen=True)
class Installed:
    """What :func:`install` made routed: keys applied generically and the generic owners' names."""

    generic_keys: frozenset[str]
    generic_owners: frozenset[str]


def install(model: nn.Module, keys: Sequence[str], routing_layers: Sequence[str]) -> Installed:
    """Make every owner of a factored key and every routing layer routed (idempotent; see module doc).

    A tied tensor (T5's ``shared.weight`` is also ``encoder.embed_tokens.weight`` and ``lm_head.weight``) is one
    factored key under its first name; every module that holds it is routed under that name, since the module
    the forward calls may be any of them."""
    modules = dict(model.named_modules())
    aliases = _aliases(model)
    generic_keys, generic_owners = set(), set()
    for key in keys:
        owner_name, name = split_key(key)
        for holder in aliases.get(key, [owner_name]):
            owner = modules[holder]
            if is_routed_kind(owner, name):
                _swap(owner, ROUTED_TYPES[plain_class(owner)], owner_name)
            elif name == "weight" and plain_class(owner).__name__ in SCALE_NORMS:
                generic_keys.add(key)
                _swap(owner, scale_norm_class(plain_class(owner)), owner_name)
            elif holder == owner_name:
                generic_keys.add(key)
                generic_owners.add(owner_name)
                _swap(owner, generic_class(plain_class(owner)), owner_name)
        parent_name, _, child = owner_name.rpartition(".")
        parent = modules.get(parent_name)
        if child == RELATIVE_BIAS_TABLE and parent is not None and hasattr(parent, "compute_bias") \
                and not isinstance(parent, RoutedRelativeBias):
            parent.__class__ = relative_bias_class(type(parent))
    for layer in routing_layers:
        _swap(modules[layer], RoutedLinear, layer)
    return Installed(frozenset(generic_keys), frozenset(generic_owners))


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """First state-dict name of each tied tensor -> the owner modules of all its names."""
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = first.setdefault(id(param), name)
        out.setdefault(key, []).append(split_key(name)[0])
    return out


def install_blocks(model: nn.Module, blocks: Sequence[str]) -> None:
    """Make the model's transformer blocks (names in forward order) skippable; after :func:`install` (a block
    that owns a factored parameter keeps its routed class underneath). Idempotent."""
    modules = dict(model.named_modules())
    for index, name in enumerate(blocks):
        module = modules[name]
        if not isinstance(module, RoutedBlock):
            module.__class__ = block_class(type(module))
        module.mass_block_index = index  # type: ignore[attr-defined]


def _swap(module: nn.Module, cls: type[nn.Module], name: str) -> None:
    if type(module) is not cls:
        module.__class__ = cls
    module.mass_name = name  # type: ignore[attr-defined]


ACTIVE: ContextVar[Pass | None] = ContextVar("massmerge_active_pass", default=None)


@contextmanager
def active(pass_: Pass | None) -> Iterator[None]:
    """Make ``pass_`` the active pass of this thread for the duration of the block."""
    token = ACTIVE.set(pass_)
    try:
        yield
    finally:
        ACTIVE.reset(token)


# ----- values shared by the passes ----------------------------------------------------------------------------

Values = Mapping[str, torch.Tensor]  # state-dict name -> the tensor to use instead of the base's


def shallow_copy(module: nn.Module, prefix: str, values: Values, generic_keys: frozenset[str]) -> nn.Module:
    """A copy of ``module`` sharing everything but the parameters in ``values`` (and the modules on the way to
    them), with its plain class: the forward of a generic owner for one set of values, with no mutation of
    the shared model (so concurrent calls are safe)."""
    clone = copy.copy(module)
    clone.__class__ = plain_class(module)
    params = dict(module._parameters)
    for name in params:
        if prefix + name in values:
            params[name] = values[prefix + name]  # a plain tensor is fine for a forward
    clone._parameters = params  # type: ignore[assignment]
    children = dict(module._modules)
    for name, child in children.items():
        child_prefix = f"{prefix}{name}."
        if child is not None and any(key.startswith(child_prefix) for key in generic_keys):
            children[name] = shallow_copy(child, child_prefix, values, generic_keys)
    clone._modules = children  # type: ignore[assignment]
    return clone


def subtree_keys(generic_keys: frozenset[str], owner: str) -> list[str]:
    """Generic keys of ``owner`` and of the modules below it."""
    prefix = f"{owner}." if owner else ""
    return [key for key in generic_keys if key.startswith(prefix)]


class Pass:
    """What routed modules do while a pass is active (subclasses implement each kind)."""

    def linear(self, module: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embedding(self, module: RoutedEmbedding, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer_norm(self, module: RoutedLayerNorm, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def generic(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError

    def block(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A transformer block: computed as it is by default (its routed children do the pass's work)."""
        return run_block(module, args, kwargs)

    def scale_norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A scale-only norm: as a generic owner by default."""
        return self.generic(module, (x,), {})

    def relative_bias(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A relative position bias: the owner's own, by default (its table is a routed Embedding)."""
        return plain_compute_bias(module, args, kwargs)


__all__ = [
    "ACTIVE",
    "RELATIVE_BIAS_TABLE",
    "SCALE_NORMS",
    "Installed",
    "Pass",
    "RoutedBlock",
    "RoutedEmbedding",
    "RoutedGeneric",
    "RoutedLayerNorm",
    "RoutedLinear",
    "RoutedRelativeBias",
    "RoutedScaleNorm",
    "StopForward",
    "Unbatchable",
    "active",
    "block_class",
    "install",
    "install_blocks",
    "plain_class",
    "plain_compute_bias",
    "register_scale_norm",
    "run_block",
    "shallow_copy",
    "split_key",
    "subtree_keys",
]
