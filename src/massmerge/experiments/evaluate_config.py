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
    create_model,
    field_validator,
    model_validator,
)

from massmerge.choices import task_name_problem
from massmerge.errors import OptionError, first_validation_error
from massmerge.mass.config import DEFAULT_EPS, ServeSettings, unset_serve_fields
from massmerge.merging.task_arithmetic import default_alpha
from massmerge.smile import SmileSettings

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


class _MassBuildOptions(_Strict):
    rank_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    eps: float | None = Field(default=DEFAULT_EPS, ge=0.0, le=1.0)
    max_size: float | None = Field(default=None, ge=0.0, description="artifact size budget x base, as build's "
                                                                    "--max-size; 0 keeps the design ranks")
    eps_off_row: bool = Field(default=False, description="also score MASS with de-redundancy off (eps null) from "
                              "the same factors, as the rows '... (eps off)': the released MASS code ran so "
                              "(evaluate_pipeline.py: 'TODO: restore no redundancy')")


PRETRAINED_ROW = "pretrained"  # the generation report's name of the base's own row (FusionBench's word)
EPS_OFF = " (eps off)"  # the suffix of the rows of MASS with de-redundancy off (``mass.eps_off_row``)


class ReferenceFigure(_Strict):
    """A published figure this run is compared with: one report row's average absolute accuracy (%), where it
    comes from, and a flag when it looks wrong (a transcription error) rather than copying it silently."""

    row: str = Field(min_length=1, description="the report row it belongs to: experts, zero-shot, a merge, "
                     "SMILE-2, MASS, 'MASS (eps off)', ...")
    value: float = Field(ge=0.0, le=100.0, description="average absolute accuracy over the config's tasks, %")
    normalized: float | None = Field(default=None, ge=0.0, le=200.0, description="normalized accuracy, %, if given")
    source: str = Field(min_length=1, description="where the figure is printed (paper table, repository file)")
    note: str | None = Field(default=None, description="what to keep in mind comparing with it")
    flag: str | None = Field(default=None, description="why the figure itself looks wrong, if it does")


#: Serve settings this file sets elsewhere (``eval.batch_size``, ``eval.dtype``, the top-level
#: ``routing_layer``) or that mean nothing to an image benchmark (``max_length``); ``mass:`` takes every other.
SERVE_SET_ELSEWHERE = ("routing_layers", "batch_size", "dtype", "max_length")
MassOptions = create_model("MassOptions", __base__=_MassBuildOptions, **unset_serve_fields(SERVE_SET_ELSEWHERE))
MassOptions.__doc__ = """MASS settings (design.md section 2). Build settings default to ``massmerge build``'s; serve
settings (every :class:`~massmerge.mass.config.ServeSettings` field but :data:`SERVE_SET_ELSEWHERE`) left unset
(None) are the family's default router, exactly what ``build`` records, and set ones override it."""


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

    family: Literal["clip", "open_clip", "text", "seq2seq"] | None = Field(default=None, description="default: "
                                                                            "detected; seq2seq: Flan-T5 on GLUE")
    base: str = Field(min_length=1)
    revision: str | None = None
    arch: str | None = Field(default=None, description="open_clip architecture, e.g. ViT-B-32")
    trust_pickle: bool | list[str] = Field(default=False, description="read pickle (.bin) weights, weights-only: "
                                           "true for every source, or a list of the sources (base, heads_from, "
                                           "experts, as written here) whose pickle is trusted")
    routing_layer: str | int | None = None
    pooling: Literal["cls", "mean"] | None = None
    heads: Literal["zeroshot", "linear"] = "zeroshot"
    heads_from: str | None = Field(default=None, description="full CLIP checkpoint for zero-shot heads (default: base)")
    tokenizer: str | None = Field(default=None, description="seq2seq: the tokenizer's repo or folder (default: base)")
    tasks: list[TaskSpec] = Field(min_length=2)
    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    mass: MassOptions = Field(default_factory=MassOptions)
    eval: EvalOptions = Field(default_factory=EvalOptions)
    output: str = "massmerge-evaluate"
    reference: list[ReferenceFigure] = Field(default_factory=list, description="published figures to compare with")

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
        rows = report_rows(METHODS, eps_off=True)  # not only this run's: --methods may run fewer
        if self.family == "seq2seq":
            rows.append(PRETRAINED_ROW)
        stray_rows = [r.row for r in self.reference if r.row not in rows]
        if stray_rows:
            raise ValueError(f"reference: row '{stray_rows[0]}' is not a row of an evaluate report "
                             f"({', '.join(rows)})")
        if isinstance(self.trust_pickle, list):
            named = {self.base, self.heads_from, *(t.expert for t in self.tasks)}
            unknown = [s for s in self.trust_pickle if s not in named]
            if unknown:
                raise ValueError(f"trust_pickle: '{unknown[0]}' is not the base, heads_from or an expert of this config")
        return self

    def report_rows(self) -> list[str]:
        """The rows (oracle-head, task-given and task-hidden ones) the report of this config holds."""
        return report_rows(self.methods, eps_off=self.mass.eps_off_row and self.mass.eps is not None)

    def trusts_pickle(self, source: str | None) -> bool:
        """Whether pickle weights of ``source`` (the base, heads_from or an expert, as written) may be read."""
        if isinstance(self.trust_pickle, bool):
            return self.trust_pickle
        return source in self.trust_pickle

    def serve_overrides(self) -> dict[str, Any]:
        """The serve settings this config sets explicitly (the rest stay the family's), and the batch size."""
        fields = [name for name in ServeSettings.model_fields if name not in SERVE_SET_ELSEWHERE]
        values = {name: getattr(self.mass, name) for name in fields if getattr(self.mass, name) is not None}
        return {**values, "batch_size": self.eval.batch_size, "dtype": self.eval.dtype}

    def merge_options(self, method: str) -> dict[str, Any]:
        """Options of one static merge: the user's, with Task Arithmetic's alpha for T tasks filled in from the
        method's own default (``task_arithmetic.default_alpha``, what ``massmerge merge`` uses) for the report."""
        options = dict(self.method_options.get(method, {}))
        if method == "task_arithmetic":
            options.setdefault("alpha", default_alpha(len(self.tasks)))
        return options


def report_rows(methods: list[str] | tuple[str, ...], *, eps_off: bool) -> list[str]:
    """The report rows ``methods`` produce (``eps_off``: with MASS's de-redundancy-off rows)."""
    smile = f"SMILE-{SmileSettings().top_k}"
    names = {"zeroshot": ["zero-shot", "zero-shot max-logit"], "experts": ["experts"],
             "smile": [smile, f"{smile} max-logit"]}
    mass = ["MASS", "MASS (task given)", "MASS oracle-head", "MASS (batch routing)"]
    rows = [row for method in methods
            for row in names.get(method, mass if method == "mass" else [method, f"{method} max-logit"])]
    return rows + [row + EPS_OFF for row in mass[:3]] if "mass" in methods and eps_off else rows


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
