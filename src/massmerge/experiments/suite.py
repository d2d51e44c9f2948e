"""``massmerge suite``: build an expert zoo from all-MiniLM-L6-v2 and packaged text, then score every method.

Flow (one way): tasks -> frozen zero-shot heads -> cached experts (:mod:`.finetune`) -> the task pool ->
the shared runner (:mod:`.runner`: zero-shot, experts, static merges, MASS assembled as ``massmerge build``
stores it and served as ``massmerge predict`` serves it) -> the report (:mod:`.report`). Router variants (the
ablation) are serve-setting views of that one model, scored on the validation split (where settings are
chosen) and on the test split (reported). Every evaluation result is cached under a key of everything that
shapes it, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from massmerge.adapters.text import TextEncoderAdapter
from massmerge.artifact.build import write_parts
from massmerge.artifact.manifest import factor_header_bytes
from massmerge.data.tasks import DEFAULT_PRESET, TaskData, get_preset, load_task
from massmerge.device import resolve_device, resolve_dtype
from massmerge.experiments import runner, scaling
from massmerge.experiments.cache import CacheKey, EvalCache
from massmerge.experiments.finetune import (
    Backbone,
    ExpertResult,
    FinetuneConfig,
    class_embeddings,
    finetune_expert,
    load_backbone,
    tokenize,
)
from massmerge.experiments.pool import TaskPool, TaskSplit
from massmerge.experiments.report import write_report
from massmerge.experiments.report.assemble import assemble_report
from massmerge.experiments.router_study import router_study
from massmerge.heads.files import write_head_file
from massmerge.heads.modules import ZeroShotHead
from massmerge.io.atomic import write_text_atomically
from massmerge.mass.build import MASSParts, assemble
from massmerge.mass.config import DEFAULT_EPS, BuildSettings, ServeSettings, apply_profile, default_routing_block
from massmerge.merging import STATIC_MERGES
from massmerge.smile import SmileSettings
from massmerge.task_vectors import task_vector

#: Training budgets: ``ci`` is cut so the whole pipeline fits 10 minutes on 2 cores; every other preset trains
#: 100 steps per expert (the 2-core budget: 40-210 s an expert).
CI_FINETUNE = FinetuneConfig(steps=60, batch_size=16, max_length=32)
FULL_FINETUNE = FinetuneConfig(steps=100, batch_size=16, max_length=48)


def preset_finetune(preset: str) -> FinetuneConfig:
    """The training budget of a preset."""
    return CI_FINETUNE if preset == "ci" else FULL_FINETUNE


class SuiteConfig(BaseModel):
    """Everything a suite run depends on; the report records it whole."""

    model_config = ConfigDict(frozen=True)

    preset: str = DEFAULT_PRESET
    tasks: tuple[str, ...] | None = None
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    finetune: FinetuneConfig | None = None
    routing_layer: str | None = None  # default: the first MLP matrix of block round(0.75 * depth)
    mass_layers: tuple[str, ...] = ()  # extra routing layers evaluated with the full MASS model
    eps: float | None = DEFAULT_EPS
    max_size: float | None = None  # the artifact size budget, as `massmerge build --max-size`
    router: str | None = None  # a named router rule applied first (mass.config.ROUTER_PROFILES, e.g. "paper")
    serve: dict[str, Any] = {}  # serve-setting overrides of MASS (eta, top_k, pooling, head_rule, ...)
    ablation: bool = True  # score the router variants on val and test
    frontier: bool = False  # score every restart block and earlier routing layers (issue 21)
    smile: SmileSettings | None = SmileSettings()  # SMILE's rows (None: left out)
    routers: bool = True  # the router study: routers that use data, the ceiling, MASS's loss split
    batch_routing: bool = True  # the paper's batch-routing row (one routing per single-task batch)
    scaling: bool | None = None  # the task-scaling curve; None: on for the wide preset only
    methods: tuple[str, ...] = STATIC_MERGES
    seed: int = 0
    eval_batch_size: int = 64
    device: str | None = None  # where experts train and every method is scored (None: the CPU)
    dtype: str | None = None  # the precision every method is scored in (None: the backbone's, float32)

    def finetune_config(self) -> FinetuneConfig:
        return self.finetune or preset_finetune(self.preset)

    def runs_scaling(self) -> bool:
        return self.preset == "wide" if self.scaling is None else self.scaling



@dataclass
class Zoo:
    """The run's fixed material: tasks, heads, experts, the backbone, the text adapter and the task pool."""

    tasks: list[TaskData]
    heads: list[ZeroShotHead]
    experts: list[ExpertResult]
    backbone: Backbone
    adapter: TextEncoderAdapter
    pool: TaskPool
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def model(self) -> nn.Module:
        return self.backbone.model


def default_routing_layer(model: nn.Module) -> str:
    """``encoder.layer.{round(0.75 * depth)}.intermediate.dense`` (design.md section 2, step 5)."""
    return f"encoder.layer.{default_routing_block(int(model.config.num_hidden_layers))}.intermediate.dense"


# ----- building the zoo ----------------------------------------------------------------------------------------


def load_tasks(cfg: SuiteConfig, data_root: Path | None) -> list[TaskData]:
    """The preset's tasks (or ``cfg.tasks``), split with the preset's sizes unless overridden."""
    preset = get_preset(cfg.preset)
    sizes = (cfg.n_train or preset.n_train, cfg.n_val or preset.n_val, cfg.n_test or preset.n_test)
    return [load_task(name, *sizes, seed=cfg.seed, root=data_root) for name in (cfg.tasks or preset.tasks)]


def make_heads(backbone: Backbone, tasks: Sequence[TaskData], logit_scale: float) -> list[ZeroShotHead]:
    """Frozen zero-shot heads from class names in prompt templates, in each dataset's class order."""
    return [ZeroShotHead(class_embeddings(backbone, t.classes, t.templates), logit_scale) for t in tasks]


def tokenize_split(tasks: Sequence[TaskData], split: str, tokenizer: Any, max_length: int,
                   batch_size: int) -> list[TaskSplit]:
    """Tokenize one split of every task once, sorted by length so batches carry little padding; the per-sample
    encodings (unpadded, for the served model) in the same order."""
    out = []
    for task in tasks:
        data = getattr(task, split)
        order = sorted(range(len(data)), key=lambda i: len(data.texts[i]))
        chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        batches = [tokenize(tokenizer, [data.texts[i] for i in c], max_length) for c in chunks]
        encoded = tokenizer([data.texts[i] for i in order], truncation=True, max_length=max_length)
        items = [{key: encoded[key][row] for key in encoded.keys()} for row in range(len(order))]
        labels = torch.tensor([data.labels[i] for i in order], dtype=torch.long)
        out.append(TaskSplit.of_lists(labels, batches, items))
    return out


def text_pool(tasks: Sequence[TaskData], heads: Sequence[ZeroShotHead], backbone: Backbone,
              adapter: TextEncoderAdapter, max_length: int, batch_size: int) -> TaskPool:
    """The suite's task pool: test and validation splits tokenized once, padded per batch as predict pads."""
    tokenizer = backbone.tokenizer

    def collate(rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return dict(tokenizer.pad(list(rows), return_tensors="pt"))

    splits = {split: tokenize_split(tasks, split, tokenizer, max_length, batch_size) for split in ("test", "val")}
    return TaskPool([t.name for t in tasks], list(heads), splits, collate, adapter.features,
                    size_of=lambda item: len(item["input_ids"]), descriptions=[t.description for t in tasks],
                    classes=[list(t.classes) for t in tasks])


def build_zoo(cfg: SuiteConfig, data_root: Path | None, cache_dir: Path) -> Zoo:
    """Load data and backbone, build heads, train (or reuse) one expert per task (on ``cfg.device``)."""
    start = time.perf_counter()
    tasks = load_tasks(cfg, data_root)
    backbone = load_backbone()
    ft = cfg.finetune_config()
    heads = make_heads(backbone, tasks, ft.logit_scale)
    timing = {"load_seconds": time.perf_counter() - start}
    start = time.perf_counter()
    device = resolve_device(cfg.device) if cfg.device else None
    experts = [finetune_expert(backbone, head, task, ft, cache_dir, device=device) for task, head in zip(tasks, heads)]
    timing["finetune_seconds"] = time.perf_counter() - start
    special = sorted(set(backbone.tokenizer.all_special_ids))
    adapter = TextEncoderAdapter(special_ids=special).bind(backbone.model)
    pool = text_pool(tasks, heads, backbone, adapter, ft.max_length, cfg.eval_batch_size)
    return Zoo(tasks, heads, experts, backbone, adapter, pool, timing)


def sweep_layers(model: nn.Module) -> list[str]:
    """Candidate routing matrices: each block's first MLP matrix and its attention query matrix."""
    depth = int(model.config.num_hidden_layers)
    mlp = [f"encoder.layer.{i}.intermediate.dense" for i in range(depth)]
    query = [f"encoder.layer.{i}.attention.self.query" for i in range(depth)]
    return mlp + query


# ----- MASS as build ships it ----------------------------------------------------------------------------------


def assemble_mass(zoo: Zoo, tvs: list[dict[str, torch.Tensor]], cfg: SuiteConfig, layer: str
                  ) -> tuple[MASSParts, ServeSettings, float]:
    """The experts' MASS parts as ``massmerge build`` stores them (the text family's default router exiting at
    ``layer``, from the float32 CPU base), and the serve settings the suite runs them with: its named router
    rule, its serve overrides and its serving precision applied."""
    start = time.perf_counter()
    build = BuildSettings(eps=cfg.eps, max_size=cfg.max_size)
    parts = assemble(zoo.model, tvs, zoo.names, zoo.heads, build=build,
                     router=zoo.adapter.default_router(zoo.model, layer), header_bytes=factor_header_bytes,
                     max_length=cfg.finetune_config().max_length)
    settings = parts.serve
    if cfg.router is not None:
        settings = apply_profile(settings, cfg.router, default_layer=layer, family_pooling=zoo.adapter.paper_pooling)
    return parts, settings.updated(**cfg.serve, dtype=cfg.dtype), time.perf_counter() - start


def serve_mass(zoo: Zoo, parts: MASSParts, settings: ServeSettings, cfg: SuiteConfig, seconds: float
               ) -> runner.ServedMASS:
    """The one served model over the parts, on the suite's device."""
    mass = parts.model(zoo.model, settings=settings, pool=zoo.adapter.pool, features=zoo.adapter.features,
                       class_names=[t.classes for t in zoo.tasks], device=cfg.device,
                       blocks=zoo.adapter.block_names(zoo.model))
    return runner.serve_parts(zoo.model, parts, mass, seconds)


def layer_rows(zoo: Zoo, served: runner.ServedMASS, cache: EvalCache, layer: str, expert: dict[str, float]
               ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """MASS rows with the routing layers ending at ``layer`` (the served model itself at its own layer)."""
    routing = served.mass.settings.routing_layers
    if layer == routing[-1]:
        return runner.mass_rows(zoo.pool, served, served.mass, cache, expert)
    layers = zoo.adapter.evidence_layers(zoo.model, layer) if len(routing) > 1 else (layer,)
    return runner.mass_rows(zoo.pool, served, served.mass.with_settings(routing_layers=layers), cache, expert,
                            suffix=f" @ {layer}")


def subset_zoo(zoo: Zoo, indices: Sequence[int]) -> Zoo:
    """The zoo of tasks ``indices`` alone: their data, heads and experts, the same backbone and adapter."""
    pick = list(indices)
    return Zoo([zoo.tasks[i] for i in pick], [zoo.heads[i] for i in pick], [zoo.experts[i] for i in pick],
               zoo.backbone, zoo.adapter, zoo.pool.subset(pick))


def scaling_point(zoo: Zoo, cfg: SuiteConfig, cache_dir: Path, layer: str, indices: Sequence[int],
                  expert: dict[str, float]) -> dict[str, Any]:
    """Every scaling method rebuilt from the experts of tasks ``indices`` alone, scored on those tasks."""
    sub = subset_zoo(zoo, indices)
    cache = EvalCache(cache_dir, run_key(sub, cfg, scope="scaling"))
    base = sub.model.state_dict()
    tvs = [task_vector(base, e.state_dict()) for e in sub.experts]
    sub_expert = {name: expert[name] for name in sub.names}
    rows = runner.static_rows(sub.pool, sub.model, base, lambda: tvs, ("task_arithmetic", "tsv_m"), cache, sub_expert)
    parts, settings, seconds = assemble_mass(sub, tvs, cfg, layer)
    served = serve_mass(sub, parts, settings, cfg, seconds)
    rows.update(runner.mass_rows(sub.pool, served, served.mass, cache, sub_expert)[0])
    return {"T": len(sub.names), "tasks": sub.names,
            "rows": {name: rows[name] for name in scaling.SCALING_METHODS if name in rows}}


def scaling_points(zoo: Zoo, cfg: SuiteConfig, cache_dir: Path, layer: str, expert: dict[str, float]
                   ) -> list[dict[str, Any]]:
    """One scaling point per seeded task subset (:func:`massmerge.experiments.scaling.task_subsets`)."""
    subsets = scaling.task_subsets(len(zoo.tasks), seed=cfg.seed)
    return [scaling_point(zoo, cfg, cache_dir, layer, indices, expert) for _, indices in subsets]


# ----- orchestration ---------------------------------------------------------------------------------------------

class SuiteRunKey(CacheKey):
    """What every cached result of a suite run shares: the experts (each keyed by its training), the training
    budget, the test texts, and where and in which precision methods are scored (kernels round differently)."""

    scope: Literal["suite", "scaling"]
    experts: tuple[str, ...]
    finetune: FinetuneConfig
    test_texts: str  # sha256 of every task's test texts, in task order
    device: str | None  # the device type when not the CPU
    dtype: str | None


def run_key(zoo: Zoo, cfg: SuiteConfig, scope: Literal["suite", "scaling"] = "suite") -> SuiteRunKey:
    """The cache key of a run over ``zoo`` (the whole zoo, or a scaling subset)."""
    device = resolve_device(cfg.device) if cfg.device else None
    texts = hashlib.sha256(json.dumps([t.test.texts for t in zoo.tasks]).encode()).hexdigest()
    return SuiteRunKey(scope=scope, experts=tuple(e.meta["key"] for e in zoo.experts), finetune=cfg.finetune_config(),
                       test_texts=texts, device=device.type if device is not None and device.type != "cpu" else None,
                       dtype=cfg.dtype)



def run_suite(cfg: SuiteConfig, *, data_root: Path | None = None, cache_dir: Path, out_dir: Path,
              export_artifact: Path | None = None) -> dict[str, Any]:
    """Run the whole suite and write report.json, report.md and the plots into ``out_dir``; return the report.

    ``export_artifact``: also write the served MASS model as an artifact there (what ``massmerge build``
    would write from the same experts), ready for ``massmerge predict``.
    """
    wall = time.perf_counter()
    zoo = build_zoo(cfg, data_root, cache_dir)
    pool, model = zoo.pool, zoo.model
    layer = cfg.routing_layer or default_routing_layer(model)
    cfg = cfg.model_copy(update={"routing_layer": layer})
    device, dtype = resolve_device(cfg.device) if cfg.device else None, resolve_dtype(cfg.dtype)
    cache = EvalCache(cache_dir, run_key(zoo, cfg))
    start = time.perf_counter()
    base = model.state_dict()
    tvs = [task_vector(base, e.state_dict()) for e in zoo.experts]
    parts, settings, factor_seconds = assemble_mass(zoo, tvs, cfg, layer)  # from the float32 base, as build does
    if export_artifact is not None:
        export(zoo, parts, settings, export_artifact)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)  # every method is scored where and as MASS is served
    zero = cache.get_or_run("zero_shot", lambda: runner.score_static(pool, model, None, label="zero-shot"))
    experts = cache.get_or_run("experts", lambda: runner.score_experts(pool, model,
                                                                          lambda t: zoo.experts[t].state_dict()))
    expert = experts["oracle"]
    T = len(zoo.tasks)
    rows: dict[str, dict[str, Any]] = {
        "zero-shot": runner.row("oracle head", zero["oracle"], expert, storage_factor=1.0),
        "zero-shot max-logit": runner.row("task hidden", zero["max_logit"], expert, storage_factor=1.0),
        "experts": runner.row("oracle head", expert, expert, storage_factor=float(T)),
    }
    rows.update(runner.static_rows(pool, model, base, lambda: tvs, cfg.methods, cache, expert))
    if cfg.smile is not None:
        rows.update(runner.smile_rows(pool, model, lambda: tvs, cache, expert, cfg.smile, cfg.eval_batch_size))
    rows["tsv_c (task given)"] = runner.row("oracle head", runner.tsv_c_accuracy(pool, model, base, lambda: tvs, cache),
                                            expert, storage_factor=parts.size_factor)
    served = serve_mass(zoo, parts, settings, cfg, factor_seconds)
    mass_details = []
    for candidate in dict.fromkeys([layer, *cfg.mass_layers]):
        new_rows, details = layer_rows(zoo, served, cache, candidate, expert)
        rows.update(new_rows)
        mass_details.append(details)
    if cfg.batch_routing:
        rows["MASS (batch routing)"] = runner.batch_routing_row(pool, served, cache, expert)
    routers = None
    if cfg.routers:
        hidden, given = runner.mass_scores(pool, served, served.mass, cache)
        routers = router_study(pool, model, served, hidden, given, cache, expert)
    sweep = cache.get_or_run("routing_sweep", lambda: {"rows": runner.routing_sweep(pool, served.mass, sweep_layers(
        model))}, served.key())["rows"]
    ablation = None
    if cfg.ablation:
        variants = runner.router_variants(zoo.adapter, model, served.mass.settings.routing_layers[-1])
        ablation = runner.ablation_rows(pool, served, variants, cache, {"test": expert, "val": experts["val"]})
    throughput = runner.throughput(pool, model, served.mass)
    frontier = None
    if cfg.frontier:
        routing = zoo.adapter.block_of(model, layer)
        frontier = runner.frontier_rows(pool, model, served, zoo.adapter, sorted({routing, 3, 2} - {0}, reverse=True),
                                        cache, {"test": expert, "val": experts["val"]})
    points = scaling_points(zoo, cfg, cache_dir, layer, expert) if cfg.runs_scaling() else None
    timing = {**zoo.timing, "evaluate_seconds": time.perf_counter() - start,
              "factorize_seconds": served.factor_seconds, "total_seconds": time.perf_counter() - wall}
    report = assemble_report(
        "suite", preset=cfg.preset, config=json.loads(cfg.model_dump_json()), settings=served.mass.settings,
        served=served, tasks=[{"name": t.name, "description": t.description, "classes": t.classes, "sizes": t.sizes}
                              for t in zoo.tasks],
        methods=rows, mass_details=mass_details, timing=timing, finetune=cfg.finetune_config().model_dump(),
        experts={t.name: e.meta for t, e in zip(zoo.tasks, zoo.experts)}, layer_sweep=sweep, throughput=throughput,
        ablation=ablation, frontier=frontier, routers=routers, scaling=points,
    )  # fmt: skip
    write_serving_files(zoo, out_dir)
    return write_report(report, out_dir)


def write_serving_files(zoo: Zoo, out_dir: Path) -> None:
    """Beside the report: one heads file per task and ``serve.json`` (the base and expert paths), which is all
    ``massmerge build`` needs to serve the suite's experts (docs/SUITE.md shows the commands)."""
    heads_dir = Path(out_dir) / "heads"
    heads_dir.mkdir(parents=True, exist_ok=True)
    for task, head in zip(zoo.tasks, zoo.heads):
        write_head_file(heads_dir / f"{task.name}.safetensors", head, task=task.name, class_names=task.classes)
    serve = {"base": str(zoo.backbone.path), "experts": [str(e.path) for e in zoo.experts],
             "heads": [str(heads_dir / f"{t.name}.safetensors") for t in zoo.tasks], "task_names": zoo.names,
             "max_length": zoo.experts[0].meta["config"]["max_length"] if zoo.experts else None}
    write_text_atomically(Path(out_dir) / "serve.json", json.dumps(serve, indent=2) + "\n")


def export(zoo: Zoo, parts: MASSParts, settings: ServeSettings, directory: Path) -> Path:
    """The suite's MASS model written as an artifact: the same stored factors, heads and tokenizer, with the
    suite's serve settings as its defaults (what ``massmerge build`` writes from the same experts)."""
    return write_parts(directory, zoo.model, parts, serve=settings, consume=False, adapter=zoo.adapter,
                       tokenizer_dir=zoo.backbone.path, class_names=[t.classes for t in zoo.tasks])

__all__ = ["CI_FINETUNE", "FULL_FINETUNE", "SuiteConfig", "SuiteRunKey", "Zoo", "build_zoo", "default_routing_layer", "export",
           "preset_finetune", "run_key", "run_suite", "write_serving_files"]
