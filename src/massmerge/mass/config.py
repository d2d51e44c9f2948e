"""MASS settings, split by when they are fixed, with every default defined here once (design.md section 2).

- :class:`BuildSettings` shape the stored factors (rank fraction, de-redundancy eps, SVD method, factor dtype,
  size budget): an artifact fixes them, and changing one means factorizing the experts again.
- :class:`ServeSettings` only shape how inputs are routed and answered (routing layers and pooling, mode, eta,
  K, tau, the head rule, alpha, batch size, max length): ``massmerge predict`` flags and ``load(...)`` keyword
  arguments override them without a rebuild. An artifact records the values it was built with as defaults.

``ROUTER_PROFILES['paper']`` is the paper's exact rule, kept reproducible whatever the defaults become.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo

from massmerge.choices import DtypeName, SVDMethod
from massmerge.errors import OptionError, first_validation_error

RoutingMode = Literal["topk", "top1", "batch"]
HeadRule = Literal["max_logit", "posterior", "joint"]
#: ``unmasked_mean``: the mean over every position, padding included: the official MASS code's Flan-T5 pooling
#: (prompts padded to 512, so pad tokens dominate z); for parity only, never a default.
Pooling = Literal["cls", "mean", "content", "tokens", "unmasked_mean"]
POOLINGS: tuple[str, ...] = get_args(Pooling)
LayerCombine = Literal["standardized", "ppca"]
#: The weights the first pass (the router's) runs with: ``merged``, theta_0 + alpha * TSV-M of all tasks (the
#: paper's rule); ``pretrained``, the base theta_0 itself (the paper's proj-PRE ablation row).
FirstPassWeights = Literal["merged", "pretrained"]
ServeDtype = Literal["float32", "float16", "bfloat16"]

DEFAULT_EPS = 0.3
DEFAULT_DELTA_SCALE = 1.0  # MASS's alpha: the merged deltas' scale in both passes (not a static merge's alpha)
DEFAULT_ETA = 0.2
DEFAULT_TOP_K = 3
DEFAULT_TAU = 1.0
DEFAULT_MAX_SIZE = 2.1  # an artifact at most 2.1x the base's bytes (design.md section 7)
DEFAULT_BATCH_SIZE = 32
ROUTING_DEPTH_FRACTION = 0.75  # the routing block: round(0.75 * depth), block 9 of a 12-block ViT


def size_budget(max_size: float | None) -> float:
    """The size budget a build cuts to, in base sizes: ``max_size`` as given (0: design ranks, no budget), or
    :data:`DEFAULT_MAX_SIZE` when unset (then best effort: a build that cannot reach it keeps design ranks)."""
    return DEFAULT_MAX_SIZE if max_size is None else max_size


def default_routing_block(depth: int) -> int:
    """Index of the routing block: ``round(0.75 * depth)``, clipped to the last block."""
    if depth < 1:
        raise OptionError(f"--routing-layer: the model has no transformer blocks (depth {depth})")
    return min(depth - 1, round(ROUTING_DEPTH_FRACTION * depth))


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BuildSettings(_Settings):
    """What the stored factors depend on (fixed in an artifact)."""

    rank_fraction: float | None = Field(default=None, gt=0.0, le=1.0, description="k = floor(min(m,n) f); None = 1/T")
    eps: float | None = Field(default=DEFAULT_EPS, ge=0.0, le=1.0, description="de-redundancy cosine; None = off")
    svd: SVDMethod = "auto"
    factor_dtype: Literal["auto"] | DtypeName = "auto"
    max_size: float | None = Field(default=None, ge=0.0, description=f"size budget x base; None = {DEFAULT_MAX_SIZE} "
                                                                      "where reachable, 0 = design ranks")

    @field_validator("max_size")
    @classmethod
    def _budget(cls, value: float | None) -> float | None:
        if value is not None and 0.0 < value <= 1.0:
            raise ValueError("must be 0 (design ranks) or above 1 (a multiple of the base's size)")
        return value


def _cli(**facts: Any) -> dict[str, Any]:
    """Command-line facts of a serve setting beyond its type and description (see :class:`SettingFlag`)."""
    return {"cli": facts}


class ServeSettings(_Settings):
    """How a MASS model routes and answers (overridable at serve time).

    The ONE declaration of the serve settings: each field's type, default, bounds and ``description`` (the help
    sentence) are what ``massmerge predict``'s flags (:func:`serve_flags`), the evaluate YAML's ``mass:`` fields,
    the help texts and ``load(..., **serve)`` keywords are made from. A new setting is one new field here.
    """

    routing_layers: tuple[Annotated[str, Field(min_length=1)], ...] = Field(
        default=(), description="routing nn.Linear name (repeat for multi-layer routing)",
        json_schema_extra=_cli(flag="--routing-layer"))  # one name per flag: the CLI spells it in the singular
    pooling: Pooling | None = Field(default=None, description=(
        "routing token pooling: cls, mean, content (mean without special tokens), tokens (RMS of each content "
        "token's residual) or unmasked_mean (every padded position: the official Flan-T5 code, parity only)"))  # None: the family's
    layer_combine: LayerCombine = Field(default="standardized",
                                        description="how several routing layers combine: standardized or ppca")
    mode: RoutingMode = Field(default="topk", description="routing mode: topk, top1 or batch (the whole input is "
                                                          "one task)")
    eta: float = Field(default=DEFAULT_ETA, ge=0.0, lt=1.0,
                       description="select tasks whose router probability exceeds FLOAT")
    top_k: int = Field(default=DEFAULT_TOP_K, ge=1, description="at most INT tasks per input")
    tau: float = Field(default=DEFAULT_TAU, gt=0.0, allow_inf_nan=False, description="router softmax temperature")
    head_rule: HeadRule = Field(default="max_logit", description=(
        "how the task is chosen among the selected: max_logit (paper), posterior (router probability x head "
        "softmax) or joint (log router probability + logits)"))
    alpha: float = Field(default=DEFAULT_DELTA_SCALE, allow_inf_nan=False, description="scale of the merged deltas")
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, description="inputs per batch, tasks mixed")
    max_length: int | None = Field(default=None, ge=1, description="text: tokens per input, clipped to the "
                                   "model's positions", json_schema_extra=_cli(
                                       artifact_default="what the experts were trained with"))  # None: the model's
    dtype: ServeDtype | None = Field(default=None, description="serving precision: float32, float16 or bfloat16",
                                     json_schema_extra=_cli(metavar="DTYPE"))  # None: the base's own
    restart_block: int = Field(default=0, ge=0, description=(
        "the block the second pass restarts at from the first pass's hidden states (0: two full passes; at most "
        "the routing layer's block)"))
    first_pass: FirstPassWeights = Field(default="merged", description=(
        "the router's weights: TSV-M of all tasks (merged) or the base (pretrained, proj-PRE)"),
        json_schema_extra=_cli(flag=None))  # an ablation of the suite's router study, not a serving choice

    def updated(self, **overrides: Any) -> ServeSettings:
        """A copy with the given fields replaced (None values are ignored), validated like the original."""
        changes = {key: value for key, value in overrides.items() if value is not None}
        return make_serve_settings(**{**self.model_dump(), **changes})


DEFAULT_MAX_NEW_TOKENS = 32


class GenerateSettings(_Settings):
    """How a generating artifact decodes: the ONE declaration of the generation options. ``massmerge predict``'s
    flags (:func:`generate_flags`), the Predictor's ``settings`` and the checks of ``MASSModel.generate``'s
    keywords come from these fields; any other HF ``generate()`` argument passes through unchecked."""

    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1, le=4096,
                                description="generation: at most INT new tokens per prompt")
    num_beams: int = Field(default=1, ge=1, le=64, description="generation: beam search with INT beams (1: none)")
    do_sample: bool = Field(default=False, description="generation: sample instead of greedy or beam decoding")
    temperature: float = Field(default=1.0, gt=0.0, le=100.0, allow_inf_nan=False,
                               description="generation: sampling temperature (with --do-sample)")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="generation: nucleus sampling mass (with "
                                                                  "--do-sample)")

    def hf(self) -> dict[str, Any]:
        """The keywords HF ``generate()`` takes; sampling-only ones only when sampling (HF warns otherwise)."""
        out = self.model_dump()
        if not self.do_sample:
            out.pop("temperature"), out.pop("top_p")
        return out


def make_generate_settings(**values: Any) -> GenerateSettings:
    """Validated :class:`GenerateSettings` (None values: the defaults); a bad value is one line naming the flag."""
    try:
        return GenerateSettings(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        where, message, value = first_validation_error(exc)
        field = where.split(".")[0] or "generation"
        raise OptionError(f"--{field.replace('_', '-')}: {message} (got {value!r})") from None


def check_generation(options: dict[str, Any]) -> None:
    """The declared generation options among HF ``generate()`` keywords, checked (one line naming the option)."""
    make_generate_settings(**{k: v for k, v in options.items() if k in GenerateSettings.model_fields})


@cache
def generate_flags() -> tuple[SettingFlag, ...]:
    """Every generation option as a command-line flag, in field order (a bool field is an on/off switch)."""
    flags = []
    for name, info in GenerateSettings.model_fields.items():
        flag = _flag_of(name, info)
        if flag is not None:
            flags.append(SettingFlag(flag.field, flag.flag, flag.metavar, bool if info.annotation is bool else
                                     flag.kind, False, flag.help, flag.default))
    return tuple(flags)


#: Named router rules. ``paper``: one routing layer (the last of ``routing_layers``: the deepest, where the first
#: pass stops), the family's paper pooling (the mean over non-padding tokens for text, the CLS token for vision),
#: standardized scores, the eta / K rule, max-logit heads.
ROUTER_PROFILES: dict[str, dict[str, Any]] = {
    "paper": {"pooling": None, "layer_combine": "standardized", "head_rule": "max_logit", "mode": "topk",
              "eta": DEFAULT_ETA, "top_k": DEFAULT_TOP_K, "tau": DEFAULT_TAU},
}


def apply_profile(settings: ServeSettings, profile: str, *, default_layer: str, family_pooling: str | None
                  ) -> ServeSettings:
    """``settings`` under a named router rule (``--router NAME``): the paper's routes on ``default_layer`` alone
    with ``family_pooling``."""
    if profile not in ROUTER_PROFILES:
        raise OptionError(f"--router: unknown rule '{profile}' (choose {', '.join(ROUTER_PROFILES)})")
    values = {**settings.model_dump(), **ROUTER_PROFILES[profile]}
    values["routing_layers"] = (default_layer,)
    values["pooling"] = family_pooling
    return make_serve_settings(**values)


@dataclass(frozen=True)
class SettingFlag:
    """A serve setting as a command-line option, derived from its :class:`ServeSettings` field.

    ``kind`` is what the CLI parses (int, float or str; a tuple field is a repeatable ``str``); ``metavar`` is
    INT, FLOAT or NAME unless the field says otherwise; ``help`` is the field's description and ``default`` the
    engine's; ``artifact_default`` says what an artifact's unset value means, where that needs words.
    """

    field: str
    flag: str
    metavar: str
    kind: type
    multiple: bool
    help: str
    default: Any
    artifact_default: str | None = None

    def value(self, parsed: Any) -> Any:
        """The setting's value from what the CLI parsed (None: unset; a repeated flag: a tuple, none given: None)."""
        if self.multiple:
            return tuple(parsed) if parsed else None
        return parsed


def _flag_of(name: str, info: FieldInfo) -> SettingFlag | None:
    facts = (info.json_schema_extra or {}).get("cli", {}) if isinstance(info.json_schema_extra, dict) else {}
    flag = facts.get("flag", "--" + name.replace("_", "-"))
    if flag is None:
        return None
    annotation = info.annotation
    multiple = get_origin(annotation) is tuple
    optional = get_origin(annotation) in (Union, UnionType)
    inner = next(a for a in get_args(annotation) if a is not type(None)) if optional else annotation
    kind = inner if inner in (int, float) and not multiple else str  # a name, a choice or a repeated name
    metavar = facts.get("metavar", {int: "INT", float: "FLOAT"}.get(kind, "NAME"))
    return SettingFlag(name, flag, metavar, kind, multiple, info.description or "", info.default,
                       facts.get("artifact_default"))


@cache
def serve_flags() -> tuple[SettingFlag, ...]:
    """Every serve setting that is a command-line option, in field order (``massmerge predict`` and
    ``massmerge serve`` take them all; a new :class:`ServeSettings` field is a new flag)."""
    flags = (_flag_of(name, info) for name, info in ServeSettings.model_fields.items())
    return tuple(flag for flag in flags if flag is not None)


def unset_serve_fields(exclude: Iterable[str] = (), settings: type[BaseModel] | None = None) -> dict[str, Any]:
    """:class:`ServeSettings`' fields (less ``exclude``) as ``pydantic.create_model`` definitions, each with the
    same type, bounds and description but unset (None) by default: a config section that may override any serve
    setting (``massmerge evaluate``'s ``mass:``), declared by the settings themselves (``settings``: a subclass)."""
    out: dict[str, Any] = {}
    for name, info in (settings or ServeSettings).model_fields.items():
        if name in exclude:
            continue
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        out[name] = (annotation | None, Field(default=None, description=info.description))
    return out


def flag_name(field: str) -> str:
    """The option that names ``field`` in errors: its flag (``routing_layers`` -> ``--routing-layer``)."""
    found = next((f.flag for f in serve_flags() if f.field == field), None)
    return found or "--" + field.replace("_", "-")


def _option_error(exc: ValidationError) -> OptionError:
    where, message, value = first_validation_error(exc)
    field = where.split(".")[0] or "settings"
    option = flag_name(field)
    return OptionError(f"{option}: {message} (got {value!r})")


def make_serve_settings(**values: Any) -> ServeSettings:
    """Validated :class:`ServeSettings`; a bad value is a one-line error naming the option."""
    if isinstance(values.get("routing_layers"), str):
        values["routing_layers"] = (values["routing_layers"],)
    try:
        return ServeSettings(**values)
    except ValidationError as exc:
        raise _option_error(exc) from None


def make_build_settings(**values: Any) -> BuildSettings:
    """Validated :class:`BuildSettings`; a bad value is a one-line error naming the option."""
    try:
        return BuildSettings(**values)
    except ValidationError as exc:
        raise _option_error(exc) from None



def check_pooling(pooling: str | None) -> None:
    """``--pooling``: None (the family's) or one of :data:`POOLINGS`, else a one-line error naming them."""
    if pooling is not None and pooling not in POOLINGS:
        raise OptionError(f"--pooling: unknown pooling '{pooling}' (choose {', '.join(POOLINGS)})")

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_DELTA_SCALE",
    "DEFAULT_EPS",
    "DEFAULT_ETA",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_MAX_SIZE",
    "DEFAULT_TAU",
    "DEFAULT_TOP_K",
    "POOLINGS",
    "ROUTER_PROFILES",
    "BuildSettings",
    "FirstPassWeights",
    "GenerateSettings",
    "HeadRule",
    "LayerCombine",
    "Pooling",
    "RoutingMode",
    "ServeSettings",
    "SettingFlag",
    "apply_profile",
    "check_generation",
    "check_pooling",
    "default_routing_block",
    "flag_name",
    "generate_flags",
    "make_build_settings",
    "make_generate_settings",
    "make_serve_settings",
    "serve_flags",
    "size_budget",
    "unset_serve_fields",
]
