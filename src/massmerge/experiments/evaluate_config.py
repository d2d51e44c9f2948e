"""The ``bench.yaml`` of ``massmerge evaluate``: a user's base, experts and test sets, and what to run.

Why a validated file: a 20-task benchmark has 60+ paths and ids; a typo found after an hour of feature
extraction is expensive, so every field is checked up front and errors name the field
(``tasks.3.dataset: ...``). See ``examples/clip_vit_b32_8tasks.yaml`` for a documented example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from massmerge.choices import task_name_problem
from massmerge.errors import OptionError, first_validation_error
from massmerge.mass.config import DEFAULT_EPS, HeadRule, Pooling, RoutingMode
from massmerge.merging.task_arithmetic import default_alpha

BASELINES = ("zeroshot", "experts")
MERGES = ("weight_average", "task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts")
METHODS = (*BASELINES, *MERGES, "smile", "mass")  # smile: SMILE-2 (massmerge.smile); mass adds batch routing


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Strict):
    """One task: its expert checkpoint and its test set."""

    name: str = Field(min_length=1, description="task name; also the key into the shipped CLIP class names")
    expert: str = Field(min_length=1, description="expert checkpoint: hub id, HF dir, safetensors file, LoRA dir")
    expert_revision: str | None = None
    dataset: str = Field(min_length=1, description="HF datasets id / local dataset dir, or an image folder")
    split: str = "test"
    subset: str | None = Field(default=None, description="HF dataset configuration name (e.g. cropped_digits)")
    image_column: str | None = None
    label_column: str | None = None
    classnames: list[str] | None = Field(default=None, description="override the shipped class names (label order)")
    templates: list[str] | None = Field(default=None, description="override the shipped prompt templates ('{}')")


class MassOptions(_Strict):
    """MASS settings (design.md section 2). Build settings default to ``massmerge build``'s; serve settings left
    unset (None) are the family's default router, exactly what ``build`` records, and set ones override it."""

    rank_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    eps: float | None = Field(default=DEFAULT_EPS, ge=0.0, le=1.0)
    max_size: float | None = Field(default=None, ge=0.0, description="artifact size budget x base, as build's "
                                                                    "--max-size; 0 keeps the design ranks")
    alpha: float | None = None
    eta: float | None = Field(default=None, ge=0.0, lt=1.0)
    top_k: int | None = Field(default=None, ge=1)
    tau: float | None = Field(default=None, gt=0.0)
    mode: RoutingMode | None = None
    head_rule: HeadRule | None = None
    pooling: Pooling | None = None
    restart_block: int | None = Field(default=None, ge=0, description="the second pass's restart block")


class EvalOptions(_Strict):
    """How much data and how it is batched."""

    batch_size: int = Field(default=32, ge=1)
    max_samples: int | None = Field(default=None, ge=1, description="per task, a seeded random subset")
    seed: int = 0
    device: str | None = Field(default=None, description="cpu, cuda, cuda:N or mps; None: cuda if visible, else cpu")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(default=None, description="serving precision")
    workers: int | None = Field(default=None, ge=0, description="image decoding processes; None: one per core but "
                                                             "one (at most 8), 0: in the main process")
    image_cache: bool = Field(default=True, description="cache each test image's pixels as uint8 on disk (under "
                                                        "--cache-dir) so it is decoded once per run, not per method")


class BenchmarkConfig(_Strict):
    """The whole benchmark (one base, T experts, T test sets)."""

    family: Literal["clip", "open_clip", "text"] | None = Field(default=None, description="default: detected")
    base: str = Field(min_length=1)
    revision: str | None = None
    arch: str | None = Field(default=None, description="open_clip architecture, e.g. ViT-B-32")
    trust_pickle: bool = False
    routing_layer: str | int | None = None
    pooling: Literal["cls", "mean"] | None = None
    heads: Literal["zeroshot", "linear"] = "zeroshot"
    heads_from: str | None = Field(default=None, description="full CLIP checkpoint for zero-shot heads (default: base)")
    tasks: list[TaskSpec] = Field(min_length=2)
    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    mass: MassOptions = Field(default_factory=MassOptions)
    eval: EvalOptions = Field(default_factory=EvalOptions)
    output: str = "massmerge-evaluate"

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method '{unknown[0]}' (choose from {', '.join(METHODS)})")
        return value

    @model_validator(mode="after")
    def _unique_tasks(self) -> BenchmarkConfig:
        problem = task_name_problem([t.name for t in self.tasks])
        if problem:
            raise ValueError(problem)
        stray = sorted(set(self.method_options) - set(MERGES))
        if stray:
            raise ValueError(f"method_options: '{stray[0]}' is not a static merge ({', '.join(MERGES)})")
        return self

    def serve_overrides(self) -> dict[str, Any]:
        """The serve settings this config sets explicitly (the rest stay the family's), and the batch size."""
        fields = ("alpha", "eta", "top_k", "tau", "mode", "head_rule", "pooling", "restart_block")
        values = {name: getattr(self.mass, name) for name in fields if getattr(self.mass, name) is not None}
        return {**values, "batch_size": self.eval.batch_size, "dtype": self.eval.dtype}

    def merge_options(self, method: str) -> dict[str, Any]:
        """Options of one static merge: the user's, with Task Arithmetic's alpha for T tasks filled in from the
        method's own default (``task_arithmetic.default_alpha``, what ``massmerge merge`` uses) for the report."""
        options = dict(self.method_options.get(method, {}))
        if method == "task_arithmetic":
            options.setdefault("alpha", default_alpha(len(self.tasks)))
        return options


def load_benchmark_config(path: str | Path, **overrides: Any) -> BenchmarkConfig:
    """Read and validate a YAML (or JSON) benchmark file; ``overrides`` replace top-level fields."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise OptionError(f"--config: {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise OptionError(f"--config: {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError as exc:
        raise OptionError(f"--config: {path}: not UTF-8 text (byte {exc.start})") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise OptionError(f"--config: {path}: nested too deeply to be a benchmark config") from None
    if not isinstance(raw, dict):
        raise OptionError(f"--config: {path}: expected a mapping at the top level")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return parse_benchmark_config(raw, name=str(path))


def parse_benchmark_config(raw: dict[str, Any], *, name: str = "config") -> BenchmarkConfig:
    """Validate a mapping; the first problem becomes a one-line error naming the field."""
    try:
        return BenchmarkConfig(**raw)
    except ValidationError as exc:
        where, message, _ = first_validation_error(exc)
        raise OptionError(f"{name}: {where or '(top level)'}: {message}") from None
