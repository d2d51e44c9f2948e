"""``massmerge evaluate --config bench.yaml``: MASS and the baselines on a user's checkpoints and test sets.

Flow (design.md section 5): adapter + base model -> heads (CLIP zero-shot from class names, or the experts'
linear classifiers) -> per-task test sets (the task pool) -> the shared runner (:mod:`.runner`): zero-shot, each
expert on its own task, every static merge, and MASS assembled exactly as ``massmerge build`` would store it from
the same experts (the same factor storage, size budget and family router) and served as ``massmerge predict``
serves it -> the report (:mod:`.report`), normalized by the experts on the same test split.

Experts are read lazily (one tensor at a time for safetensors) and reduced to factors one expert at a time.
Every score is cached under a key of the config and the files it names, so an interrupted run resumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from massmerge.adapters import BaseAdapter, detect_family, get_adapter
from massmerge.adapters.lora import LoraExpert, build_lora_factors, load_lora_expert
from massmerge.adapters.weights import open_weights
from massmerge.artifact.manifest import factor_header_bytes
from massmerge.data.images import (
    ImageDataset,
    Preprocess,
    check_label_space,
    image_collate,
    image_size_of,
    load_image_dataset,
    open_image,
)
from massmerge.data.pixels import PixelCache, default_workers, split_batches
from massmerge.device import describe as describe_device
from massmerge.device import resolve_device, resolve_dtype
from massmerge.errors import OptionError
from massmerge.experiments import runner
from massmerge.experiments.cache import CacheKey, EvalCache
from massmerge.experiments.evaluate_config import EPS_OFF, MERGES, BenchmarkConfig
from massmerge.experiments.pool import TaskPool, TaskSplit
from massmerge.experiments.report import write_report
from massmerge.experiments.report.assemble import assemble_report
from massmerge.heads.files import head_width
from massmerge.heads.zoo import (
    clip_task,
    clip_zero_shot_heads,
    linear_head_from_state,
    load_hf_clip_text,
)
from massmerge.mass.build import MASSParts, assemble
from massmerge.mass.config import BuildSettings, ServeSettings
from massmerge.smile import SmileSettings
from massmerge.sources import resolve_source
from massmerge.task_vectors import CheckedTaskVector, add_delta

Log = Callable[[str], None]
DEFAULT_CACHE = Path.home() / ".cache" / "massmerge" / "evaluate"


@dataclass
class Workbench:
    """Everything loaded once and shared by all methods."""

    config: BenchmarkConfig
    adapter: BaseAdapter
    model: nn.Module
    base_state: dict[str, torch.Tensor]
    heads: list[nn.Module]
    datasets: list[ImageDataset]
    preprocess: Preprocess
    lora: list[LoraExpert] | None = None
    log: Log = print

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.config.tasks]


def prepare(config: BenchmarkConfig, *, log: Log = print) -> Workbench:
    """Load the base model, heads and test sets; check that the label spaces agree."""
    if config.family == "text":
        raise OptionError("family: `massmerge evaluate` runs image benchmarks; evaluate text experts with `massmerge suite`")
    if config.family == "seq2seq":
        raise OptionError("family: seq2seq experts generate; run them with evaluate() (experiments/generation_eval.py)")
    family = config.family or _detect(config)
    options: dict[str, Any] = {"routing_layer": config.routing_layer, "pooling": config.pooling}
    if family == "open_clip":
        options["arch"] = config.arch
    adapter = get_adapter(family, **options)
    log(f"loading base {config.base}")
    model = adapter.load_model(config.base, revision=config.revision, trust_pickle=config.trusts_pickle(config.base))
    adapter.bind(model)
    base_state = {k: model.state_dict()[k].detach().clone() for k in adapter.encoder_keys(model)}
    lora = _load_lora(config, base_state)
    heads = build_heads(config, lora)
    check_feature_width(config, adapter, model, heads)
    preprocess = Preprocess.from_model_dir(resolve_source(config.base, config.revision), image_size=image_size_of(model))
    datasets = []
    for task, head in zip(config.tasks, heads, strict=True):
        log(f"loading test set {task.dataset} ({task.name})")
        data = load_image_dataset(task.dataset, classnames=_classnames(task), split=task.split, subset=task.subset,
                                  image_column=task.image_column, label_column=task.label_column)
        data = data.subset(config.eval.max_samples, config.eval.seed)
        check_label_space(data, head.num_classes, task=task.name)
        datasets.append(data)
    return Workbench(config, adapter, model.eval(), base_state, heads, datasets, preprocess, lora, log)


def _detect(config: BenchmarkConfig) -> str:
    return detect_family(resolve_source(config.base, config.revision))


def _classnames(task: Any) -> list[str] | None:
    if task.classnames:
        return list(task.classnames)
    try:
        return list(clip_task(task.name)["classnames"])
    except OptionError:
        return None


def _load_lora(config: BenchmarkConfig, base_state: dict[str, torch.Tensor]) -> list[LoraExpert] | None:
    """LoRA experts if every expert is a PEFT adapter directory; mixing formats is refused."""
    paths = [resolve_source(t.expert, t.expert_revision) for t in config.tasks]
    is_lora = [(p / "adapter_config.json").is_file() for p in paths]
    if not any(is_lora):
        return None
    if not all(is_lora):
        raise OptionError("tasks: mix of LoRA adapters and full checkpoints; use one kind of expert")
    return [load_lora_expert(p, list(base_state), base_state, trust_pickle=config.trusts_pickle(t.expert))
            for p, t in zip(paths, config.tasks, strict=True)]


def build_heads(config: BenchmarkConfig, lora: list[LoraExpert] | None) -> list[nn.Module]:
    """Zero-shot heads from the CLIP text tower, or each expert's linear classifier."""
    if config.heads == "linear":
        heads = []
        for index, task in enumerate(config.tasks):
            state = lora[index].head_state if lora else _raw_expert(config, task)
            heads.append(linear_head_from_state(state, name=task.expert))
        return heads
    if config.family == "open_clip":
        raise OptionError("heads: zero-shot heads for open_clip need open_clip's tokenizer; use heads: linear")
    source = config.heads_from or config.base
    encode, scale = load_hf_clip_text(source, revision=None if config.heads_from else config.revision,
                                      trust_pickle=config.trusts_pickle(source))
    overrides = {t.name: {"classnames": t.classnames, "templates": t.templates} for t in config.tasks}
    return clip_zero_shot_heads(encode, [t.name for t in config.tasks], logit_scale=scale, overrides=overrides)


def check_feature_width(config: BenchmarkConfig, adapter: BaseAdapter, model: nn.Module,
                        heads: list[nn.Module]) -> None:
    """Every head must read the base's feature width, checked before the first SVD as ``build`` does: a CLIP
    base read without its ``visual_projection`` gives vision-width features that no zero-shot head can score."""
    width = adapter.feature_dim(model)
    for task, head in zip(config.tasks, heads, strict=True):
        if width is None or head_width(head) == width:
            continue
        missing = getattr(adapter, "projection", "") is None and not hasattr(model, "visual_projection")
        where = (f"the zero-shot head of task '{task.name}' (text tower of {config.heads_from or config.base})"
                 if config.heads == "zeroshot" else f"the linear head of task '{task.name}' (from {task.expert})")
        raise OptionError(f"base {config.base}: its image features are {width} wide"
                          f"{' (it has no visual_projection)' if missing else ''}, but {where} reads "
                          f"{head_width(head)}")


def _raw_expert(config: BenchmarkConfig, task: Any) -> Mapping[str, torch.Tensor]:
    return open_weights(resolve_source(task.expert, task.expert_revision), trust_pickle=config.trusts_pickle(task.expert))


# ----- the task pool and the experts ---------------------------------------------------------------------------

def task_pool(wb: Workbench, pixel_dir: Path | None = None) -> TaskPool:
    """The user's test sets as a task pool: batches of ``eval.batch_size`` images decoded by ``eval.workers``
    processes as they are needed (items: the rows of those batches), and with ``pixel_dir`` each split's pixels
    cached there as uint8 by its first pass (:mod:`massmerge.data.pixels`), so later passes decode nothing."""
    size, workers = wb.config.eval.batch_size, wb.config.eval.workers
    workers = default_workers() if workers is None else workers

    def split(task: Any, data: ImageDataset) -> TaskSplit:
        keys, load = [key for key, _ in data.items], data.loader or open_image
        cache = pixel_cache(pixel_dir, task, data, wb.preprocess) if pixel_dir is not None else None

        def batches() -> Iterator[torch.Tensor]:
            return split_batches(keys, load, wb.preprocess, size, workers=workers, cache=cache)

        return TaskSplit(data.labels(), batches=lambda: ({"pixel_values": pixels} for pixels in batches()),
                         items=lambda: (row for pixels in batches() for row in pixels))

    splits = [split(t, d) for t, d in zip(wb.config.tasks, wb.datasets, strict=True)]
    return TaskPool(wb.task_names, wb.heads, {"test": splits}, image_collate, wb.adapter.features,
                    descriptions=[_description(t) for t in wb.config.tasks], classes=[list(d.classes) for d in wb.datasets])


class PixelCacheKey(CacheKey):
    """What one task's uint8 test images depend on: the dataset (and, for local files, their sizes and times),
    its config, split, image column and items, and the transform."""

    fingerprint: Any
    dataset: str
    subset: str | None
    split: str
    image_column: str | None
    items: list[str]
    transform: str


def pixel_cache(folder: Path, task: Any, data: ImageDataset, preprocess: Preprocess) -> PixelCache:
    """The uint8 cache file of one task's test items (:class:`PixelCacheKey`)."""
    key = PixelCacheKey(fingerprint=_fingerprint(task.dataset), dataset=task.dataset, subset=task.subset,
                        split=task.split, image_column=task.image_column, items=[str(k) for k, _ in data.items],
                        transform=repr(preprocess)).digest()
    return PixelCache(folder / f"{key}.u8", len(data), (3, preprocess.crop, preprocess.crop), preprocess)


def _description(task: Any) -> str:
    return f"expert {task.expert} on {task.dataset} ({task.split})"


def expert_vector(wb: Workbench, task: int) -> Mapping[str, torch.Tensor]:
    """Task vector of expert ``task``: lazy ``expert - base`` (dense checkpoints) or LoRA's ``scale B A``."""
    if wb.lora is not None:
        return wb.lora[task].task_vector(wb.base_state)
    spec = wb.config.tasks[task]
    expert = wb.adapter.load_weights(spec.expert, wb.model, revision=spec.expert_revision,
                                     trust_pickle=wb.config.trusts_pickle(spec.expert))
    return CheckedTaskVector(wb.base_state, expert, name=spec.expert)


def expert_params(wb: Workbench, task: int) -> dict[str, torch.Tensor]:
    """The expert's own weights over the merged keys, ``base + delta`` cast back to the base dtype."""
    vector = expert_vector(wb, task)
    return {key: add_delta(wb.base_state[key], vector[key]) for key in vector}


def build_settings(config: BenchmarkConfig) -> BuildSettings:
    """What ``massmerge build`` would be run with: the config's rank fraction, eps and budget, else build's."""
    opts = config.mass
    return BuildSettings(rank_fraction=opts.rank_fraction, eps=opts.eps, max_size=opts.max_size)


def build_mass(wb: Workbench) -> tuple[MASSParts, runner.ServedMASS]:
    """MASS as ``massmerge build`` would ship it from these experts, served on the config's device."""
    parts, seconds = assemble_mass(wb)
    return parts, serve_mass(wb, parts, seconds)


def assemble_mass(wb: Workbench) -> tuple[MASSParts, float]:
    """The parts ``massmerge build`` would store from these experts (factors streamed, or LoRA factors built
    without densifying), from the base in its own precision on the CPU, as build reads it."""
    start = time.perf_counter()
    build = build_settings(wb.config)
    if wb.lora is not None:
        shapes = {k: tuple(v.shape) for k, v in wb.base_state.items()}
        experts: Any = build_lora_factors(wb.lora, wb.task_names, shapes, rank_fraction=build.rank_fraction,
                                          eps=build.eps)
    else:
        experts = (expert_vector(wb, t) for t in range(len(wb.task_names)))
    parts = assemble(wb.model, experts, wb.task_names, wb.heads, build=build, router=wb.adapter.default_router(wb.model),
                     header_bytes=factor_header_bytes)
    return parts, time.perf_counter() - start


def serve_mass(wb: Workbench, parts: MASSParts, seconds: float) -> runner.ServedMASS:
    """The one served model over the parts, with the config's explicit serve settings on top of the family's
    router, on the config's device."""
    settings = parts.serve.updated(**wb.config.serve_overrides())
    mass = parts.model(wb.model, settings=settings, pool=wb.adapter.pool, features=wb.adapter.features,
                       class_names=[list(d.classes) for d in wb.datasets], device=resolve_device(wb.config.eval.device),
                       blocks=wb.adapter.block_names(wb.model))
    return runner.serve_parts(wb.model, parts, mass, seconds)


def eps_off_rows(wb: Workbench, pool: TaskPool, parts: MASSParts, seconds: float, cache: EvalCache,
                 expert: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """MASS with de-redundancy off beside the configured run (``mass.eps_off_row``): the same stored factors (no
    second SVD) with every task merged in the first pass, as the released MASS code ran."""
    every = list(range(len(wb.task_names)))
    factors = replace(parts.factors, accepted={key: every for key in parts.factors.matrices}, eps=None)
    variant = replace(parts, factors=factors, build=parts.build.model_copy(update={"eps": None}))
    served = serve_mass(wb, variant, seconds)
    return runner.mass_rows(pool, served, served.mass, cache, expert, suffix=EPS_OFF)[0]


# ----- the run ---------------------------------------------------------------------------------------------------

class EvaluateRunKey(CacheKey):
    """What every cached result of an evaluate run shares: the config (less where the report goes, the reference
    figures and whether the eps-off rows are added, which shape no score) and, for local files, their sizes and
    times, so an expert or dataset changed in place misses the cache."""

    config: dict[str, Any]
    sources: list[Any]


def cache_key(config: BenchmarkConfig) -> EvaluateRunKey:
    """The run's cache key (:class:`EvaluateRunKey`)."""
    sources = [config.base, config.heads_from, config.tokenizer,
               *(s for t in config.tasks for s in (t.expert, t.dataset))]
    return EvaluateRunKey(config=config.model_dump(mode="json", exclude={"output": True, "reference": True,
                                                                         "mass": {"eps_off_row"},
                                                                         "eval": {"workers", "image_cache"}}),
                          sources=[_fingerprint(s) for s in sources if s])


def _fingerprint(source: str) -> Any:
    path = Path(source)
    if not path.exists():
        return source  # a hub id: its name and the config's revision are the key
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    return [str(path.resolve()), [(str(p.relative_to(path)) if p != path else "", p.stat().st_size,
                                   p.stat().st_mtime_ns) for p in files[:10000]]]


def run_benchmark(config: BenchmarkConfig, *, log: Log = print, cache_dir: Path | None = None) -> dict[str, Any]:
    """Run every configured method through the shared runner; returns the report (not yet written)."""
    wall = time.perf_counter()
    wb = prepare(config, log=log)
    root = cache_dir or DEFAULT_CACHE
    pool, model = task_pool(wb, root / "pixels" if config.eval.image_cache else None), wb.model
    cache = EvalCache(root, cache_key(config))
    methods = list(config.methods)
    assembled = assemble_mass(wb) if "mass" in methods else None  # from the CPU base, as build reads it
    device = resolve_device(config.eval.device)
    log(f"device: {describe_device(device)}")
    model.to(device=device, dtype=resolve_dtype(config.eval.dtype))  # every method is scored where MASS is served
    rows: dict[str, dict[str, Any]] = {}
    experts = cache.get_or_run("experts", lambda: runner.score_experts(pool, model, lambda t: expert_params(wb, t)))
    expert = experts["oracle"]
    T = len(wb.task_names)
    if "zeroshot" in methods:
        log("method zeroshot")
        zero = cache.get_or_run("zero_shot", lambda: runner.score_static(pool, model, None, label="zero-shot"))
        rows["zero-shot"] = runner.row("oracle head", zero["oracle"], expert, storage_factor=1.0)
        rows["zero-shot max-logit"] = runner.row("task hidden", zero["max_logit"], expert, storage_factor=1.0)
    rows["experts"] = runner.row("oracle head", expert, expert, storage_factor=float(T))
    merges = [m for m in methods if m in MERGES]
    rows.update(runner.static_rows(pool, model, wb.base_state,
                                   lambda: [expert_vector(wb, t) for t in range(T)], merges, cache, expert,
                                   options=config.merge_options))
    if "smile" in methods:
        log("method smile")
        rows.update(runner.smile_rows(pool, model, lambda: [expert_vector(wb, t) for t in range(T)], cache, expert,
                                      SmileSettings(), config.eval.batch_size))
    details, served = None, None
    settings = ServeSettings(routing_layers=(wb.adapter.routing_layer(model),)).updated(**config.serve_overrides())
    if assembled is not None:
        log("method mass")
        served = serve_mass(wb, *assembled)
        mass_rows, details = runner.mass_rows(pool, served, served.mass, cache, expert)
        rows.update(mass_rows)
        rows["MASS (batch routing)"] = runner.batch_routing_row(pool, served, cache, expert)
        if config.mass.eps_off_row and config.mass.eps is not None:
            log("method mass (eps off)")
            rows.update(eps_off_rows(wb, pool, *assembled, cache, expert))
        settings = served.mass.settings
    return assemble_report(
        "evaluate", preset=None, settings=settings, served=served, methods=rows,
        config={**config.model_dump(mode="json"), "routing_layer": settings.routing_layers[-1], "eps": config.mass.eps,
                "adapter": wb.adapter.describe()},
        tasks=[{"name": t.name, "description": _description(t), "classes": list(d.classes),
                "sizes": {"train": 0, "val": 0, "test": len(d)},
                "source": {"expert": t.expert, "dataset": t.dataset, "split": t.split}}
               for t, d in zip(config.tasks, wb.datasets, strict=True)],
        mass_details=[details] if details else [], timing={"total_seconds": time.perf_counter() - wall})


def evaluate(config: BenchmarkConfig, *, log: Log = print, cache_dir: Path | None = None,
             show: bool = True) -> dict[str, Any]:
    """Run the benchmark and write report.json, report.md and the plots to the config's output folder."""
    if config.family == "seq2seq":  # experts that generate: FusionBench's GLUE protocol, its own report
        from massmerge.experiments.generation_eval import evaluate_generation

        cache = EvalCache(cache_dir or DEFAULT_CACHE, cache_key(config))
        return evaluate_generation(config, cache=cache, log=log, show=show)
    return write_report(run_benchmark(config, log=log, cache_dir=cache_dir), Path(config.output), show=show)


__all__ = ["DEFAULT_CACHE", "Workbench", "build_mass", "cache_key", "evaluate", "prepare", "run_benchmark",
           "task_pool"]
