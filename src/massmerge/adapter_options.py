"""The adapter options, declared once: what ``build`` takes for a family, what an artifact's manifest records and
what ``load`` passes back to the adapter.

Torch-free on purpose: the command line builds ``--pooling`` / ``--feature-pooling`` from this table before it
imports torch, and the manifest schema (:class:`massmerge.artifact.manifest.AdapterOptions`) is made from it, so a
new option is one row here. :mod:`massmerge.adapters.families` re-exports it beside the family table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field

from massmerge.errors import OptionError
from massmerge.mass.config import POOLINGS


@dataclass(frozen=True)
class AdapterOption:
    """One option an adapter takes at build (and a manifest records): its name, the families that take it, its
    closed choices (None: free, of type ``value``) and its help."""

    name: str
    families: tuple[str, ...]
    choices: tuple[str, ...] | None
    help: str
    value: Any = str  # the type of a free value (a manifest field's type); a closed option is one of `choices`

    @property
    def annotation(self) -> Any:
        """The manifest field's type: one of the choices, or the declared value type; None always allowed."""
        kind = Literal[self.choices] if self.choices is not None else self.value  # type: ignore[valid-type]
        return kind | None

    @property
    def flag(self) -> str:
        """The build flag that sets it (``--feature-pooling``)."""
        return "--" + self.name.replace("_", "-")

    @property
    def metavar(self) -> str:
        """The flag's metavar: the choices joined by ``|``."""
        return "|".join(self.choices) if self.choices is not None else self.name.upper()


FEATURE_POOLINGS = ("mean", "cls", "pooler")
ADAPTER_OPTIONS: dict[str, AdapterOption] = {option.name: option for option in (
    AdapterOption("pooling", ("text", "clip", "open_clip", "seq2seq"), tuple(POOLINGS),
                  "how the routing layer's input becomes one vector per sample"),
    AdapterOption("feature_pooling", ("text",), FEATURE_POOLINGS,
                  "text features the heads read: mean over the mask, cls (token 0) or pooler (BERT's tanh pooler)"),
    AdapterOption("special_ids", ("text",), None, "the tokenizer's special token ids (content pooling leaves "
                  "them out); read from the model directory", value=list[Annotated[int, Field(ge=0)]]),
    AdapterOption("arch", ("open_clip",), None, "the open_clip architecture name (e.g. ViT-B-32)"),
)}


def recorded_options(adapter: Any) -> dict[str, Any]:
    """The declared options a bound adapter holds (what an artifact's manifest records), tuples as lists."""
    out = {}
    for name in ADAPTER_OPTIONS:
        value = getattr(adapter, name, None)
        if value is not None:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def check_adapter_options(family: str, options: Mapping[str, Any], where: str = "adapter") -> dict[str, Any]:
    """The options a family takes, checked against the declaration (one line naming the option at fault)."""
    out = {}
    for name, value in options.items():
        option = ADAPTER_OPTIONS.get(name)
        if option is None:
            raise OptionError(f"{where}: unknown adapter option '{name}' (known: {', '.join(ADAPTER_OPTIONS)})")
        if value is None:
            continue
        if family not in option.families:
            raise OptionError(f"{where}: option '{name}' is for the {', '.join(option.families)} family, not {family}")
        if option.choices is not None and value not in option.choices:
            raise OptionError(f"{where}: {name} '{value}' is not one of {', '.join(option.choices)}")
        out[name] = value
    return out


__all__ = ["ADAPTER_OPTIONS", "FEATURE_POOLINGS", "AdapterOption", "check_adapter_options", "recorded_options"]
