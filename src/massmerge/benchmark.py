"""Run MASS and the baselines on a user's real checkpoints and test sets (``massmerge evaluate``).

Flow (design.md section 5): adapter + base model -> heads (CLIP zero-shot from class names, or the experts'
linear classifiers) -> per-task test sets -> for each method, the weights it produces (base, each expert on its
own task, one static merge, or the two-pass MASS model) -> accuracy with the true task's head (oracle) and with
the task hidden (max-logit head selection, as MASS must do) -> normalized by the expert's accuracy on the
same split -> report (JSON + Markdown).

Experts are read lazily (one tensor at a time for safetensors) and reduced to factors one expert at a time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from massmerge import evaluate as ev
from massmerge.adapters import BaseAdapter, get_adapter
from massmerge.adapters.lora import LoraExpert, build_lora_factors, load_lora_expert
from massmerge.benchmark_config import MERGES, BenchmarkConfig
from massmerge.data.images import ImageDataset, Preprocess, check_label_space, load_image_dataset
from massmerge.errors import OptionError
from massmerge.sources import resolve_source
from massmerge.task_vectors import CheckedTaskVector, add_delta

Log = Callable[[str], None]


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
    expert_cache: dict[int, Mapping[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.config.tasks]


def prepare(config: BenchmarkConfig, *, log: Log = print) -> Workbench:
    """Load the base model, heads and test sets; check that the label spaces agree."""
    if config.family == "text":
        raise OptionError("family: `massmerge evaluate` runs image benchmarks; evaluate text experts with `massmerge suite`")
    family = config.family or _detect(config)
    options: dict[str, Any] = {"routing_layer": config.routing_layer, "pooling": config.pooling}
    if family == "open_clip":
        options["arch"] = config.arch
    adapter = get_adapter(family, **options)
    log(f"loading base {config.base}")
    model = adapter.load_model(config.base, revision=config.revision, trust_pickle=config.trust_pickle)
    base_state = {k: model.state_dict()[k].detach().clone() for k in adapter.encoder_keys(model)}
    lora = _load_lora(config, base_state)
    heads = build_heads(config, lora)
    preprocess = Preprocess.from_model_dir(resolve_source(config.base, config.revision), image_size=_image_size(model))
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
    from massmerge.adapters import detect_family

    return detect_family(resolve_source(config.base, config.revision))


def _image_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", config)
    return getattr(vision, "image_size", None)


def _classnames(task: Any) -> list[str] | None:
    from massmerge.heads.zoo import clip_task

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
    return [load_lora_expert(p, list(base_state), base_state, trust_pickle=config.trust_pickle) for p in paths]


def build_heads(config: BenchmarkConfig, lora: list[LoraExpert] | None) -> list[nn.Module]:
    """Zero-shot heads from the CLIP text tower, or each expert's linear classifier."""
    from massmerge.heads.zoo import clip_zero_shot_heads, linear_head_from_state, load_hf_clip_text

    if config.heads == "linear":
        heads = []
        for index, task in enumerate(config.tasks):
            state = lora[index].head_state if lora else _raw_expert(config, task)
            heads.append(linear_head_from_state(state, name=task.expert))
        return heads
    if config.family == "open_clip":
        raise OptionError("heads: zero-shot heads for open_clip need open_clip's tokenizer; use heads: linear")
    encode, scale = load_hf_clip_text(config.heads_from or config.base, revision=None if config.heads_from else config.revision)
    overrides = {t.name: {"classnames": t.classnames, "templates": t.templates} for t in config.tasks}
    return clip_zero_shot_heads(encode, [t.name for t in config.tasks], logit_scale=scale, overrides=overrides)


def _raw_expert(config: BenchmarkConfig, task: Any) -> Mapping[str, torch.Tensor]:
    from massmerge.adapters.weights import open_weights

    return open_weights(resolve_source(task.expert, task.expert_revision), trust_pickle=config.trust_pickle)


# ----- running weights on data ------------------------------------------------------------------------------

class _Runner(nn.Module):
    """``features(model, batch)`` as a module, so functional_call can swap the model's parameters."""

    def __init__(self, model: nn.Module, features: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.features = features

    def forward(self, batch: Any) -> torch.Tensor:
        return self.features(self.model, batch)


@torch.no_grad()
def features_of(wb: Workbench, params: Mapping[str, torch.Tensor] | None, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, d], labels [N]) of one task's test set under ``params`` (None = the base weights)."""
    runner = _Runner(wb.model, wb.adapter.features)
    swapped = {f"model.{k}": v for k, v in (params or {}).items()}
    feats, labels = [], []
    for pixels, y in wb.datasets[task].batches(wb.preprocess, wb.config.eval.batch_size):
        feats.append(functional_call(runner, swapped, ({"pixel_values": pixels},), strict=False))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def expert_vector(wb: Workbench, task: int) -> Mapping[str, torch.Tensor]:
    """Task vector of expert ``task``: lazy ``expert - base`` (dense checkpoints) or LoRA's ``scale B A``."""
    if wb.lora is not None:
        return wb.lora[task].task_vector(wb.base_state)
    spec = wb.config.tasks[task]
    expert = wb.adapter.load_weights(spec.expert, wb.model, revision=spec.expert_revision, trust_pickle=wb.config.trust_pickle)
    return CheckedTaskVector(wb.base_state, expert)


def apply_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base + delta`` over the delta's keys, cast back to the base dtype (:func:`add_delta`, the one place)."""
    return {k: add_delta(base[k], delta[k]) for k in delta}


def score_static(wb: Workbench, params: Mapping[str, torch.Tensor] | None) -> dict[str, dict[str, float]]:
    """Oracle-head and max-logit (task hidden) accuracy of one set of weights on every task."""
    oracle, hidden = {}, {}
    for t, name in enumerate(wb.task_names):
        feats, labels = features_of(wb, params, t)
        oracle[name] = ev.oracle_head_accuracy(feats, wb.heads[t], labels)
        hidden[name] = ev.max_logit_accuracy(feats, wb.heads, t, labels)
    return {"oracle": oracle, "max_logit": hidden}


def score_experts(wb: Workbench) -> dict[str, dict[str, float]]:
    """Each expert on its own task with its own head (the normalizer)."""
    oracle = {}
    for t, name in enumerate(wb.task_names):
        wb.log(f"expert {name}")
        params = apply_delta(wb.base_state, dict(expert_vector(wb, t).items()))
        feats, labels = features_of(wb, params, t)
        oracle[name] = ev.oracle_head_accuracy(feats, wb.heads[t], labels)
    return {"oracle": oracle}


def score_merge(wb: Workbench, method: str) -> dict[str, Any]:
    """One static merge of all experts, scored with the oracle head and with max-logit selection."""
    from massmerge import merging

    options = wb.config.merge_options(method)
    start = time.perf_counter()
    merged = merging.merge(method, wb.base_state, [expert_vector(wb, t) for t in range(len(wb.task_names))], **options)
    seconds = time.perf_counter() - start
    return {**score_static(wb, merged), "merge_seconds": seconds, "options": options}


def build_mass(wb: Workbench) -> Any:
    """The MASS model over the base, with factors streamed from the experts (or from LoRA without densifying)."""
    from massmerge.mass import ExpertFactors, MASSModel, make_serve_settings
    from massmerge.lowrank import rank_fraction_for as default_rank_fraction

    opts = wb.config.mass
    layer = wb.adapter.routing_layer(wb.model)
    fraction = default_rank_fraction(len(wb.task_names), opts.rank_fraction)
    if wb.lora is not None:
        shapes = {k: tuple(v.shape) for k, v in wb.base_state.items()}
        factors = build_lora_factors(wb.lora, wb.task_names, shapes, rank_fraction=fraction, eps=opts.eps)
    else:
        stream = (expert_vector(wb, t) for t in range(len(wb.task_names)))
        factors = ExpertFactors.build(stream, wb.task_names, rank_fraction=fraction, eps=opts.eps)
    settings = make_serve_settings(routing_layers=(layer,), alpha=opts.alpha, eta=opts.eta, top_k=opts.top_k,
                                   tau=opts.tau, mode=opts.mode, head_rule=opts.head_rule, pooling=opts.pooling)
    return MASSModel(wb.model, factors, wb.heads, settings, pool=wb.adapter.pool, features=wb.adapter.features)


@torch.no_grad()
def score_mass(wb: Workbench) -> dict[str, Any]:
    """MASS with the task hidden: right task and right class; plus routing accuracy and confusion."""
    start = time.perf_counter()
    mass = build_mass(wb)
    build_seconds = time.perf_counter() - start
    accuracy, true_tasks, routed = {}, [], []
    for t, name in enumerate(wb.task_names):
        correct, count = 0, 0
        for pixels, labels in wb.datasets[t].batches(wb.preprocess, wb.config.eval.batch_size):
            out = mass({"pixel_values": pixels})
            correct += int(((out.task == t) & (out.label == labels)).sum())
            count += len(labels)
            true_tasks.append(torch.full_like(labels, t))
            routed.append(out.probs.argmax(dim=1))
        accuracy[name] = correct / max(count, 1)
    confusion = ev.routing_confusion(torch.cat(true_tasks), torch.cat(routed), len(wb.task_names))
    routing = dict(zip(wb.task_names, ev.routing_accuracy_per_task(confusion), strict=True))
    return {"max_logit": accuracy, "routing_accuracy": routing, "routing_confusion": confusion.tolist(),
            "dropped": mass.factors.dropped(), "build_seconds": build_seconds,
            "storage_factor": ev.storage_factor(mass.factors.numel() + _numel(wb.base_state), _numel(wb.base_state))}


def _numel(state: Mapping[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state.values())


def run_benchmark(config: BenchmarkConfig, *, log: Log = print) -> dict[str, Any]:
    """Run every configured method; returns the report (the suite's row format, see :func:`summarize`)."""
    wb = prepare(config, log=log)
    results: dict[str, Any] = {}
    for method in config.methods:
        log(f"method {method}")
        results[method] = _score(wb, method)
    return summarize(wb, results)


def _score(wb: Workbench, method: str) -> dict[str, Any]:
    if method == "zeroshot":
        return score_static(wb, None)
    if method == "experts":
        return score_experts(wb)
    if method in MERGES:
        return score_merge(wb, method)
    return score_mass(wb)


def _row(kind: str, accuracy: dict[str, float], expert: dict[str, float] | None, **extra: Any) -> dict[str, Any]:
    """One report row as the offline suite writes it: absolute and normalized accuracy per task and averaged."""
    normalized = ev.normalized_accuracy(accuracy, expert) if expert else {}
    return {"kind": kind, "accuracy": accuracy, "normalized": normalized, "avg_accuracy": ev.mean(accuracy),
            "avg_normalized": ev.mean(normalized) if normalized else None, **extra}


def summarize(wb: Workbench, results: dict[str, Any]) -> dict[str, Any]:
    """Rows per method and kind (oracle head / task hidden), normalized by the expert on the same split."""
    expert = results.get("experts", {}).get("oracle")
    T = len(wb.task_names)
    rows: dict[str, dict[str, Any]] = {}
    for method, result in results.items():
        if method == "zeroshot":
            rows["zero-shot"] = _row("oracle head", result["oracle"], expert, storage_factor=1.0)
            rows["zero-shot max-logit"] = _row("task hidden", result["max_logit"], expert, storage_factor=1.0)
        elif method == "experts":
            rows["experts"] = _row("oracle head", result["oracle"], expert, storage_factor=float(T))
        elif method == "mass":
            rows["MASS"] = _row("task hidden", result["max_logit"], expert, storage_factor=result["storage_factor"])
        else:
            extra = {"merge_seconds": result["merge_seconds"], "options": result["options"], "storage_factor": 1.0}
            rows[method] = _row("oracle head", result["oracle"], expert, **extra)
            rows[f"{method} max-logit"] = _row("task hidden", result["max_logit"], expert, storage_factor=1.0)
    tasks = [{"name": t.name, "expert": t.expert, "dataset": t.dataset, "split": t.split, "classes": d.classes,
              "samples": len(d)} for t, d in zip(wb.config.tasks, wb.datasets, strict=True)]
    return {"tasks": tasks, "methods": rows, "mass": results.get("mass"), "adapter": wb.adapter.describe(),
            "routing_layer": wb.adapter.routing_layer(wb.model), "config": wb.config.model_dump(mode="json")}


# ----- report -------------------------------------------------------------------------------------------------

def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _md_table(report: Mapping[str, Any], metric: str) -> list[str]:
    tasks = [t["name"] for t in report["tasks"]]
    avg = "avg_accuracy" if metric == "accuracy" else "avg_normalized"
    lines = ["| method | kind | " + " | ".join(tasks) + " | avg |", "|" + "---|" * (len(tasks) + 3)]
    for name, row in report["methods"].items():
        cells = [_pct(row[metric].get(t)) for t in tasks]
        bold = "**" if name == "MASS" else ""
        lines.append(f"| {bold}{name}{bold} | {row['kind']} | " + " | ".join(cells) + f" | {bold}{_pct(row[avg])}{bold} |")
    return lines


def markdown_report(report: Mapping[str, Any]) -> str:
    """report.md: the suite's two tables (absolute, normalized), then MASS routing per task."""
    out = ["# massmerge evaluate", "", f"Routing layer `{report['routing_layer']}`; `task hidden` rows (max-logit "
           "heads, MASS) count a prediction only with the right task and class.", "",
           "## Absolute accuracy (%)", "", *_md_table(report, "accuracy"), ""]
    if any(row["normalized"] for row in report["methods"].values()):
        out += ["## Normalized accuracy (% of each expert on the same test split)", "", *_md_table(report, "normalized"), ""]
    mass = report.get("mass")
    if mass:
        out += ["## MASS routing", "", "| task | top-1 routing accuracy |", "|---|---|"]
        out += [f"| {t} | {_pct(v)} |" for t, v in mass["routing_accuracy"].items()]
        dropped = "; ".join(f"`{k}`: {', '.join(v)}" for k, v in mass["dropped"].items()) or "nothing"
        out += ["", f"Storage: {mass['storage_factor']:.2f}x the base. De-redundancy left out of the first pass: {dropped}.", ""]
    return "\n".join(out)


def write_report(report: Mapping[str, Any], output: str | Path) -> tuple[Path, Path]:
    """``report.json`` and ``report.md`` in ``output`` (written atomically)."""
    from massmerge.io.atomic import atomic_write

    folder = Path(output)
    json_path, md_path = folder / "report.json", folder / "report.md"
    atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    atomic_write(md_path, lambda tmp: tmp.write_text(markdown_report(report)))
    return json_path, md_path


__all__ = ["Workbench", "markdown_report", "prepare", "run_benchmark", "write_report"]
