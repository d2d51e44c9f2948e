"""The offline suite: build an expert zoo from all-MiniLM-L6-v2 and packaged text, then score every method.

Flow (one way): tasks -> frozen zero-shot heads -> cached experts -> task vectors -> static merges and MASS ->
accuracy on each task's test split with the task hidden (max-logit heads) and given (oracle head) -> report.
MASS is scored through the one :class:`~massmerge.mass.MASSModel` that ``massmerge predict`` serves, built from
factors stored exactly as ``massmerge build`` stores them (:func:`~massmerge.mass.budget.stored_factors`) and
with the text adapter's pooling and features. Router variants (the ablation) are serve-setting views of that
one model, scored on the validation split (where settings are chosen) and on the test split (reported).
Every evaluation result is cached under a key of everything that shapes it, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from massmerge import evaluate as ev
from massmerge import progress
from massmerge.adapters.text import TextEncoderAdapter
from massmerge.io.atomic import atomic_write
from massmerge.data.tasks import DEFAULT_PRESET, TaskData, get_preset, load_task
from massmerge.finetune import Backbone, FinetuneConfig, class_embeddings, features, finetune_expert, load_backbone
from massmerge.finetune import tokenize
from massmerge.heads import ZeroShotHead
from massmerge.mass import router
from massmerge.mass.budget import stored_factors, tensor_bytes
from massmerge.mass.config import (
    DEFAULT_EPS,
    ROUTER_PROFILES,
    apply_profile,
    default_routing_block,
    make_serve_settings,
)
from massmerge.mass.experts import ExpertFactors
from massmerge.mass.model import MASSModel
from massmerge.mass.serving import first_pass_batches, serve
from massmerge.merging import STATIC_MERGES, merge
from massmerge.task_vectors import task_vector

#: Training budgets: ``ci`` is cut so the whole pipeline fits 10 minutes on 2 cores; every other preset trains
#: 100 steps per expert (the 2-core budget: 40-210 s an expert).
CI_FINETUNE = FinetuneConfig(steps=60, batch_size=16, max_length=32)
FULL_FINETUNE = FinetuneConfig(steps=100, batch_size=16, max_length=48)


def preset_finetune(preset: str) -> FinetuneConfig:
    """The training budget of a preset."""
    return CI_FINETUNE if preset == "ci" else FULL_FINETUNE
REPORT_SCHEMA_VERSION = 2


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
    methods: tuple[str, ...] = STATIC_MERGES
    seed: int = 0
    eval_batch_size: int = 64

    def finetune_config(self) -> FinetuneConfig:
        return self.finetune or preset_finetune(self.preset)


@dataclass
class SplitBatches:
    """One task's split, tokenized once: length-sorted padded batches (static models) and per-sample encodings
    in the same order (the served MASS model batches them itself)."""

    batches: list[dict[str, torch.Tensor]]
    labels: torch.Tensor  # in batch order
    items: list[dict[str, list[int]]]  # one unpadded encoding per sample, in batch order

    @property
    def size(self) -> int:
        return int(self.labels.numel())


@dataclass
class Zoo:
    """The run's fixed material: tasks, heads, experts, tokenized splits and the text adapter."""

    tasks: list[TaskData]
    heads: list[ZeroShotHead]
    experts: list[Any]
    splits: dict[str, list[SplitBatches]]
    backbone: Backbone
    adapter: TextEncoderAdapter
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def tests(self) -> list[SplitBatches]:
        return self.splits["test"]


def default_routing_layer(model: nn.Module) -> str:
    """``encoder.layer.{round(0.75 * depth)}.intermediate.dense`` (design.md section 2, step 5)."""
    return f"encoder.layer.{default_routing_block(int(model.config.num_hidden_layers))}.intermediate.dense"


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


class EvalCache:
    """JSON results keyed by a hash of everything that shaped them, so a rerun skips finished work."""

    def __init__(self, root: Path, base_key: str) -> None:
        self.root, self.base_key = root / "evals", base_key

    def get_or_run(self, name: str, fn: Callable[[], dict[str, Any]], **settings: Any) -> dict[str, Any]:
        path = self.root / f"{name}-{_hash([self.base_key, name, settings])}.json"
        if path.exists():
            return json.loads(path.read_text())
        result = fn()
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result)))
        return result


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
                   batch_size: int) -> list[SplitBatches]:
    """Tokenize one split of every task once, sorted by length so batches carry little padding."""
    out = []
    for task in tasks:
        data = getattr(task, split)
        order = sorted(range(len(data)), key=lambda i: len(data.texts[i]))
        chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        batches = [tokenize(tokenizer, [data.texts[i] for i in c], max_length) for c in chunks]
        encoded = tokenizer([data.texts[i] for i in order], truncation=True, max_length=max_length)
        items = [{key: encoded[key][row] for key in encoded.keys()} for row in range(len(order))]
        out.append(SplitBatches(batches, torch.tensor([data.labels[i] for i in order], dtype=torch.long), items))
    return out


def build_zoo(cfg: SuiteConfig, data_root: Path | None, cache_dir: Path) -> Zoo:
    """Load data and backbone, build heads, train (or reuse) one expert per task."""
    start = time.perf_counter()
    tasks = load_tasks(cfg, data_root)
    backbone = load_backbone()
    ft = cfg.finetune_config()
    heads = make_heads(backbone, tasks, ft.logit_scale)
    timing = {"load_seconds": time.perf_counter() - start}
    start = time.perf_counter()
    experts = [finetune_expert(backbone, head, task, ft, cache_dir) for task, head in zip(tasks, heads)]
    timing["finetune_seconds"] = time.perf_counter() - start
    splits = {split: tokenize_split(tasks, split, backbone.tokenizer, ft.max_length, cfg.eval_batch_size)
              for split in ("test", "val")}
    special = sorted(set(backbone.tokenizer.all_special_ids))
    adapter = TextEncoderAdapter(special_ids=special).bind(backbone.model)
    return Zoo(tasks, heads, experts, splits, backbone, adapter, timing)


# ----- scoring static models -------------------------------------------------------------------------------------


@torch.inference_mode()
def test_features(model: nn.Module, tests: Sequence[SplitBatches], which: Sequence[int] | None = None,
                  label: str = "evaluate") -> dict[int, torch.Tensor]:  # fmt: skip
    """Final features of the test splits ``which`` (default all) under ``model``."""
    which = list(range(len(tests))) if which is None else list(which)
    jobs = [(t, b) for t in which for b in tests[t].batches]
    out: dict[int, list[torch.Tensor]] = {t: [] for t in which}
    for t, batch in progress.track(jobs, label):
        out[t].append(features(model, batch).float())
    return {t: torch.cat(v) for t, v in out.items()}


def score_features(zoo: Zoo, feats: dict[int, torch.Tensor], *, max_logit: bool = True) -> dict[str, Any]:
    """Per task: oracle-head accuracy and (when every task's features are there) max-logit accuracy."""
    names = zoo.names
    oracle = {names[t]: ev.oracle_head_accuracy(f, zoo.heads[t], zoo.tests[t].labels) for t, f in feats.items()}
    result: dict[str, Any] = {"oracle": oracle}
    if max_logit:
        result["max_logit"] = {
            names[t]: ev.max_logit_accuracy(f, zoo.heads, t, zoo.tests[t].labels) for t, f in feats.items()
        }
    return result


def _with_state(zoo: Zoo, state: dict[str, torch.Tensor]) -> nn.Module:
    model = zoo.backbone.model
    work = type(model)(model.config).eval()
    work.load_state_dict(state)
    return work


def score_state(zoo: Zoo, state: dict[str, torch.Tensor], label: str) -> dict[str, Any]:
    """Oracle-head and max-logit accuracy of one merged model on every task's test split."""
    return score_features(zoo, test_features(_with_state(zoo, state), zoo.tests, label=label))


def score_experts(zoo: Zoo) -> dict[str, Any]:
    """Each expert on its own test and validation splits (the normalizers of every other method)."""
    oracle: dict[str, float] = {}
    val: dict[str, float] = {}
    for t, expert in enumerate(zoo.experts):
        model = _with_state(zoo, expert.state_dict())
        feats = test_features(model, zoo.tests, [t], label=f"expert {zoo.names[t]}")
        oracle.update(score_features(zoo, feats, max_logit=False)["oracle"])
        val_feats = test_features(model, zoo.splits["val"], [t], label=f"expert {zoo.names[t]} (val)")
        val[zoo.names[t]] = ev.oracle_head_accuracy(val_feats[t], zoo.heads[t], zoo.splits["val"][t].labels)
    return {"oracle": oracle, "val": val}


# ----- scoring MASS ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def score_mass(zoo: Zoo, mass: MASSModel, split: str = "test", label: str = "MASS") -> dict[str, Any]:
    """MASS with the task hidden, served as ``massmerge predict`` serves (:func:`massmerge.mass.serving.serve`
    over every task's items): strict (task, class) accuracy and where it loses.

    Per task: routing top-1, the true task among the selected (``selection_recall``), the final task choice,
    the class given the right task, the true task's head on the routed features (``oracle_head``), the routing
    confusion, and the wall time per input of the whole served call.
    """
    names, T = zoo.names, len(zoo.names)
    splits = zoo.splits[split]
    items = [item for s in splits for item in s.items]
    true = torch.cat([torch.full((s.size,), t) for t, s in enumerate(splits)])
    labels = torch.cat([s.labels for s in splits])
    tokenizer = zoo.backbone.tokenizer

    def collate(rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return dict(tokenizer.pad(list(rows), return_tensors="pt"))

    start = time.perf_counter()
    predictions = list(progress.track(serve(mass, items, collate, batch_size=mass.settings.batch_size,
                                            size_of=lambda item: len(item["input_ids"]), return_features=True),
                                      f"{label} ({split})", total=len(items)))
    seconds = time.perf_counter() - start
    task = torch.tensor([p.task for p in predictions])
    label_pred = torch.tensor([p.label for p in predictions])
    probs = torch.stack([p.probs for p in predictions])
    selected = torch.stack([p.selected for p in predictions])
    features = torch.stack([p.features for p in predictions])
    oracle = torch.cat([zoo.heads[t](features[true == t]).argmax(-1) for t in range(T)])
    right_task, top1 = task == true, probs.argmax(-1)
    correct = right_task & (label_pred == labels)
    chosen_true = selected[torch.arange(len(true)), true]

    def per_task(values: torch.Tensor, over: torch.Tensor | None = None) -> dict[str, float]:
        out = {}
        for t in range(T):
            mask = (true == t) if over is None else (true == t) & over
            out[names[t]] = float(values[mask].float().mean()) if bool(mask.any()) else 0.0
        return out

    confusion = ev.routing_confusion(true, top1, T)
    return {
        "max_logit": per_task(correct), "oracle_head": per_task(oracle == labels),
        "routing_accuracy": per_task(top1 == true), "selection_recall": per_task(chosen_true),
        "task_choice": per_task(right_task), "class_given_task": per_task(label_pred == labels, right_task),
        "confusion": confusion.tolist(), "mean_selected": float(selected.sum(1).float().mean()),
        "task_sets": len({tuple(row.nonzero().flatten().tolist()) for row in selected}),
        "seconds_per_input": seconds / len(items),
    }


def _batch_labels(split: SplitBatches, index: int) -> torch.Tensor:
    start = sum(int(b["input_ids"].shape[0]) for b in split.batches[:index])
    return split.labels[start:start + int(split.batches[index]["input_ids"].shape[0])]


@torch.inference_mode()
def score_mass_task_given(zoo: Zoo, mass: MASSModel) -> dict[str, Any]:
    """MASS's second pass with the true task as the only selected task (routing made perfect)."""
    oracle = {}
    for t, name in enumerate(zoo.names):
        split = zoo.tests[t]
        correct = 0
        for i, batch in enumerate(progress.track(split.batches, f"MASS task given {name}")):
            correct += int((mass(batch, task=t).label == _batch_labels(split, i)).sum())
        oracle[name] = correct / split.size
    return {"oracle": oracle}


@torch.inference_mode()
def routing_sweep(zoo: Zoo, mass: MASSModel, layers: Sequence[str]) -> list[dict[str, Any]]:
    """Top-1 routing accuracy and selection recall per candidate routing matrix, from one first pass.

    Every candidate's input is captured in a single first pass (its weights do not depend on the routing
    layer), pooled as the served model pools (the engine's own residuals), and routed by the paper's rule
    against that matrix's subspaces.
    """
    view = mass.with_settings(routing_layers=tuple(layers))
    s = mass.settings
    residuals: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    true = []
    for t, split in enumerate(zoo.tests):
        for batch in split.batches:
            for layer, res in view.layer_residuals(batch).items():
                residuals[layer].append(res)
            true.append(torch.full((batch["input_ids"].shape[0],), t))
    true_t = torch.cat(true)
    rows = []
    for layer in layers:
        probs, selected = router.select(torch.cat(residuals[layer]), mode="topk", eta=s.eta, top_k=s.top_k, tau=s.tau)
        conf = ev.routing_confusion(true_t, probs.argmax(-1), len(zoo.names))
        per_task = dict(zip(zoo.names, ev.routing_accuracy_per_task(conf)))
        rows.append({"layer": layer, "routing_accuracy": per_task, "mean": ev.mean(per_task),
                     "selection_recall": ev.selection_recall(true_t, selected)})  # fmt: skip
    return rows


def sweep_layers(model: nn.Module) -> list[str]:
    """Candidate routing matrices: each block's first MLP matrix and its attention query matrix."""
    depth = int(model.config.num_hidden_layers)
    mlp = [f"encoder.layer.{i}.intermediate.dense" for i in range(depth)]
    query = [f"encoder.layer.{i}.attention.self.query" for i in range(depth)]
    return mlp + query


def router_variants(zoo: Zoo, layer: str) -> dict[str, dict[str, Any]]:
    """Serve-setting variants of the ablation (issue 9): the paper's rule, each data-free change alone, and all
    of them together (the text family's default router, ``TextEncoderAdapter.default_router``).

    Multi-layer routing uses every linear layer the first pass computes before it stops at ``layer``
    (``evidence_layers``), so it costs no extra forward; ``ppca`` adds the layers' log-likelihoods and, being
    sharp, selects one task almost always.
    """
    model = zoo.backbone.model
    paper = {**ROUTER_PROFILES["paper"], "routing_layers": (layer,), "pooling": zoo.adapter.paper_pooling}
    several = zoo.adapter.evidence_layers(model, layer)
    return {
        "paper": paper,
        "content pooling": {**paper, "pooling": "content"},
        "token residuals": {**paper, "pooling": "tokens"},
        "multi-layer (standardized)": {**paper, "routing_layers": several},
        "ppca, one layer": {**paper, "layer_combine": "ppca"},
        "multi-layer (ppca)": {**paper, "routing_layers": several, "layer_combine": "ppca"},
        "posterior head": {**paper, "head_rule": "posterior"},
        "joint head": {**paper, "head_rule": "joint"},
        "all: content + multi-layer ppca": {**paper, "pooling": "content", "routing_layers": several,
                                            "layer_combine": "ppca"},
        "token residuals + multi-layer ppca": {**paper, "pooling": "tokens", "routing_layers": several,
                                               "layer_combine": "ppca"},
    }


# ----- orchestration ---------------------------------------------------------------------------------------------


def _row(kind: str, accuracy: dict[str, float], expert: dict[str, float], **extra: Any) -> dict[str, Any]:
    normalized = ev.normalized_accuracy(accuracy, expert)
    return {"kind": kind, "accuracy": accuracy, "normalized": normalized, "avg_accuracy": ev.mean(accuracy),
            "avg_normalized": ev.mean(normalized), **extra}  # fmt: skip


def _task_vectors(zoo: Zoo) -> list[dict[str, torch.Tensor]]:
    base = zoo.backbone.model.state_dict()
    return [task_vector(base, expert.state_dict()) for expert in zoo.experts]


def _throughput(zoo: Zoo, mass: MASSModel, count: int = 512) -> dict[str, Any]:
    """Inputs/s of the served MASS model (:func:`~massmerge.mass.serving.serve`, as ``massmerge predict``) and of
    the plain base forward + mean pool, on the same ``count`` test texts of mixed tasks, same batch size."""
    import random

    items = [item for split in zoo.tests for item in split.items]
    random.Random(0).shuffle(items)
    items = items[:count]
    tokenizer, size = zoo.backbone.tokenizer, mass.settings.batch_size

    def collate(rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return dict(tokenizer.pad(list(rows), return_tensors="pt"))

    batches = first_pass_batches([len(item["input_ids"]) for item in items], size, len(zoo.names))

    def base() -> None:  # batched as serve batches its first pass: the same padding
        with torch.inference_mode():
            for rows in batches:
                features(zoo.backbone.model, collate([items[i] for i in rows]))

    def served() -> None:
        list(serve(mass, items, collate, batch_size=size, size_of=lambda item: len(item["input_ids"])))

    plain = ev.throughput(base, len(items), repeats=1)
    routed = ev.throughput(served, len(items), repeats=1)
    return {"base_samples_per_s": plain, "mass_samples_per_s": routed, "ratio": routed / plain,
            "path": f"massmerge.mass.serving.serve (what massmerge predict runs), {len(items)} test texts of mixed "
                    f"tasks in input order, batch {size}, warm caches; base: forward + mean pool, batched as serve "
                    "batches its first pass (length-sorted windows)"}


def _static_rows(zoo: Zoo, tvs: list[dict[str, torch.Tensor]], cfg: SuiteConfig, cache: EvalCache,
                 expert: dict[str, float]) -> dict[str, dict[str, Any]]:  # fmt: skip
    rows: dict[str, dict[str, Any]] = {}
    base = zoo.backbone.model.state_dict()
    for name in cfg.methods:

        def run(name: str = name) -> dict[str, Any]:
            start = time.perf_counter()
            state = merge(name, base, tvs)
            seconds = time.perf_counter() - start
            return {**score_state(zoo, state, f"evaluate {name}"), "merge_seconds": seconds}

        result = cache.get_or_run(name, run)
        rows[name] = _row("oracle head", result["oracle"], expert, merge_seconds=result["merge_seconds"],
                          storage_factor=1.0)  # fmt: skip
        rows[f"{name} max-logit"] = _row("task hidden", result["max_logit"], expert, storage_factor=1.0)
    return rows


def _tsv_c_row(zoo: Zoo, tvs: list[dict[str, torch.Tensor]], cache: EvalCache) -> dict[str, float]:
    base = zoo.backbone.model.state_dict()

    def run() -> dict[str, Any]:
        oracle: dict[str, float] = {}
        for t in range(len(tvs)):
            feats = test_features(_with_state(zoo, merge("tsv_c", base, tvs, task=t)), zoo.tests, [t],
                                  label=f"evaluate tsv_c {zoo.names[t]}")  # fmt: skip
            oracle.update(score_features(zoo, feats, max_logit=False)["oracle"])
        return {"oracle": oracle}

    return cache.get_or_run("tsv_c", run)["oracle"]


def served_settings(zoo: Zoo, cfg: SuiteConfig, layer: str) -> Any:
    """The serve settings ``massmerge build`` records for these experts (the family's default router, exiting
    at ``layer``), with the suite's named router rule and overrides applied."""
    router = zoo.adapter.default_router(zoo.backbone.model, layer)
    settings = make_serve_settings(**router, max_length=cfg.finetune_config().max_length)
    if cfg.router is not None:
        settings = apply_profile(settings, cfg.router, default_layer=layer, family_pooling=zoo.adapter.paper_pooling)
    return settings.updated(**cfg.serve)


@dataclass
class Served:
    """The MASS model the suite scores, and what its stored factors cost."""

    mass: MASSModel
    storage: dict[str, Any]
    build_key: dict[str, Any]
    factor_seconds: float


def build_served(zoo: Zoo, tvs: list[dict[str, torch.Tensor]], cfg: SuiteConfig, layer: str) -> Served:
    """Factors built and stored as ``massmerge build`` does, served by the one MASS model."""
    start = time.perf_counter()
    factors = ExpertFactors.build(tvs, zoo.names, eps=cfg.eps)
    state = zoo.backbone.model.state_dict()
    base_bytes = tensor_bytes(state.values())
    base_dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    from massmerge.mass.storage import storage_dtype

    stored = stored_factors(factors, zoo.heads, base_bytes, storage_dtype(base_dtype), cfg.max_size)
    seconds = time.perf_counter() - start
    settings = served_settings(zoo, cfg, layer)
    mass = MASSModel(zoo.backbone.model, stored.factors, zoo.heads, settings, pool=zoo.adapter.pool,
                     features=zoo.adapter.features)
    base_numel = sum(v.numel() for v in state.values() if v.is_floating_point())
    storage = {"base_numel": base_numel, "factor_numel": stored.factors.numel(), "base_dtype": str(base_dtype)
               .removeprefix("torch."), "factor_dtype": str(stored.store).removeprefix("torch."),
               "bytes_ratio": stored.size_factor, "rank_scale": stored.rank_scale}
    build_key = {"eps": cfg.eps, "rank_scale": stored.rank_scale, "factor_dtype": storage["factor_dtype"]}
    return Served(mass, storage, build_key, seconds)


def _mass_rows(zoo: Zoo, served: Served, cache: EvalCache, layer: str, expert: dict[str, float]
               ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    routing = served.mass.settings.routing_layers
    mass = served.mass if layer == routing[-1] else served.mass.with_settings(
        routing_layers=zoo.adapter.evidence_layers(zoo.backbone.model, layer) if len(routing) > 1 else (layer,))
    settings = {**served.build_key, **mass.settings.model_dump(mode="json")}
    hidden = cache.get_or_run("mass", lambda: score_mass(zoo, mass), **settings)
    given = cache.get_or_run("mass_task_given", lambda: score_mass_task_given(zoo, mass), **served.build_key,
                             alpha=mass.settings.alpha)
    storage = served.storage["bytes_ratio"]
    suffix = "" if mass is served.mass else f" @ {layer}"
    rows = {
        f"MASS (task given){suffix}": _row("oracle routing", given["oracle"], expert, storage_factor=storage),
        f"MASS oracle-head{suffix}": _row("oracle head", hidden["oracle_head"], expert, storage_factor=storage),
        f"MASS{suffix}": _row("task hidden", hidden["max_logit"], expert, storage_factor=storage),
    }
    keys = ("routing_accuracy", "selection_recall", "task_choice", "class_given_task", "confusion",
            "mean_selected", "task_sets")
    return rows, {"layer": layer, **{k: hidden[k] for k in keys}}


def ablation_rows(zoo: Zoo, served: Served, cache: EvalCache, expert: dict[str, dict[str, float]]
                  ) -> list[dict[str, Any]]:
    """Every router variant on the validation split (where defaults are chosen) and the test split."""
    layer = served.mass.settings.routing_layers[-1]
    rows = []
    for name, overrides in router_variants(zoo, layer).items():
        view = served.mass.with_settings(**overrides)
        settings = {**served.build_key, **view.settings.model_dump(mode="json")}
        for split in ("val", "test"):
            result = cache.get_or_run(f"ablation-{split}", lambda v=view, s=split: score_mass(zoo, v, s, name),
                                      **settings)
            normalized = ev.normalized_accuracy(result["max_logit"], expert[split])
            rows.append({"name": name, "settings": {k: overrides[k] for k in sorted(overrides)}, "split": split,
                         "accuracy": result["max_logit"], "normalized": normalized,
                         "avg_normalized": ev.mean(normalized), "routing_accuracy": result["routing_accuracy"],
                         "seconds_per_input": result["seconds_per_input"]})
    return rows


def run_suite(cfg: SuiteConfig, *, data_root: Path | None = None, cache_dir: Path, out_dir: Path,
              export_artifact: Path | None = None) -> dict[str, Any]:
    """Run the whole suite and write report.json, report.md and the plots into ``out_dir``; return the report.

    ``export_artifact``: also write the served MASS model as an artifact there (what ``massmerge build``
    would write from the same experts), ready for ``massmerge predict``.
    """
    wall = time.perf_counter()
    zoo = build_zoo(cfg, data_root, cache_dir)
    layer = cfg.routing_layer or default_routing_layer(zoo.backbone.model)
    cfg = cfg.model_copy(update={"routing_layer": layer})
    cache = EvalCache(cache_dir, _hash([e.meta["key"] for e in zoo.experts] + [cfg.finetune_config().model_dump(),
                                        [t.test.texts for t in zoo.tasks]]))  # fmt: skip
    start = time.perf_counter()
    zero = cache.get_or_run("zero_shot", lambda: score_state(zoo, zoo.backbone.model.state_dict(), "zero-shot"))
    experts = cache.get_or_run("experts-v2", lambda: score_experts(zoo))
    expert = experts["oracle"]
    T = len(zoo.tasks)
    rows: dict[str, dict[str, Any]] = {
        "zero-shot": _row("oracle head", zero["oracle"], expert, storage_factor=1.0),
        "zero-shot max-logit": _row("task hidden", zero["max_logit"], expert, storage_factor=1.0),
        "experts": _row("oracle head", expert, expert, storage_factor=float(T)),
    }
    tvs = _task_vectors(zoo)
    rows.update(_static_rows(zoo, tvs, cfg, cache, expert))
    served = build_served(zoo, tvs, cfg, layer)
    rows["tsv_c (task given)"] = _row("oracle head", _tsv_c_row(zoo, tvs, cache), expert,
                                      storage_factor=served.storage["bytes_ratio"])
    mass_details = []
    for candidate in dict.fromkeys([layer, *cfg.mass_layers]):
        new_rows, details = _mass_rows(zoo, served, cache, candidate, expert)
        rows.update(new_rows)
        mass_details.append(details)
    sweep = cache.get_or_run("routing_sweep", lambda: {"rows": routing_sweep(zoo, served.mass, sweep_layers(
        zoo.backbone.model))}, **served.build_key, **served.mass.settings.model_dump(mode="json"))["rows"]
    ablation = ablation_rows(zoo, served, cache, {"test": expert, "val": experts["val"]}) if cfg.ablation else None
    if export_artifact is not None:
        export(zoo, served, export_artifact)
    timing = {**zoo.timing, "evaluate_seconds": time.perf_counter() - start,
              "factorize_seconds": served.factor_seconds, "total_seconds": time.perf_counter() - wall}
    report = {
        "schema_version": REPORT_SCHEMA_VERSION, "preset": cfg.preset,
        "config": {**json.loads(cfg.model_dump_json()), "eta": served.mass.settings.eta,
                   "top_k": served.mass.settings.top_k, "serve_settings": served.mass.settings.model_dump(mode="json")},
        "finetune": cfg.finetune_config().model_dump(),
        "tasks": [{"name": t.name, "description": t.description, "classes": t.classes, "sizes": t.sizes}
                  for t in zoo.tasks],
        "experts": {t.name: e.meta for t, e in zip(zoo.tasks, zoo.experts)},
        "methods": rows, "mass": mass_details[0], "mass_layers": mass_details, "dropped": served.mass.factors.dropped(),
        "layer_sweep": sweep, "throughput": _throughput(zoo, served.mass),
        "storage": {k: v for k, v in served.storage.items() if k != "rank_scale"}, "timing": timing,
        "threads": torch.get_num_threads(), "ablation": ablation,
    }  # fmt: skip
    from massmerge.suite_report import targets, write_report

    report["targets"] = targets(report)
    write_serving_files(zoo, out_dir)
    return write_report(report, out_dir)


def write_serving_files(zoo: Zoo, out_dir: Path) -> None:
    """Beside the report: one heads file per task and ``serve.json`` (the base and expert paths), which is all
    ``massmerge build`` needs to serve the suite's experts (docs/SUITE.md shows the commands)."""
    from massmerge.heads.files import write_head_file

    heads_dir = Path(out_dir) / "heads"
    heads_dir.mkdir(parents=True, exist_ok=True)
    for task, head in zip(zoo.tasks, zoo.heads):
        write_head_file(heads_dir / f"{task.name}.safetensors", head, task=task.name, class_names=task.classes)
    serve = {"base": str(zoo.backbone.path), "experts": [str(e.path) for e in zoo.experts],
             "heads": [str(heads_dir / f"{t.name}.safetensors") for t in zoo.tasks], "task_names": zoo.names,
             "max_length": zoo.experts[0].meta["config"]["max_length"] if zoo.experts else None}
    atomic_write(Path(out_dir) / "serve.json", lambda tmp: tmp.write_text(json.dumps(serve, indent=2) + "\n"))


def export(zoo: Zoo, served: Served, directory: Path) -> Path:
    """The served MASS model saved as an artifact (the same factors, heads, settings and tokenizer)."""
    from massmerge.artifact import save_artifact
    from massmerge.mass.config import BuildSettings

    build = BuildSettings(eps=served.build_key["eps"], max_size=None)
    return save_artifact(served.mass, directory, build=build, adapter=zoo.adapter, tokenizer_dir=zoo.backbone.path,
                         factor_dtype=served.storage["factor_dtype"], class_names=[t.classes for t in zoo.tasks],
                         rank_scale=served.storage["rank_scale"])
