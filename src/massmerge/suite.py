"""The offline suite: build an expert zoo from all-MiniLM-L6-v2 and packaged text, then score every method.

Flow (one way): tasks -> frozen zero-shot heads -> cached experts -> task vectors -> static merges and MASS ->
accuracy on each task's test split with the task hidden (max-logit heads) and given (oracle head) -> report.
Every evaluation result is cached under a key of everything that shapes it, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
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
from massmerge.data.tasks import TaskData, get_preset, load_task
from massmerge.finetune import Backbone, FinetuneConfig, class_embeddings, features, finetune_expert, load_backbone
from massmerge.finetune import tokenize
from massmerge.heads import ZeroShotHead
from massmerge.mass import ExpertFactors, MASSModel, make_config, mean_pool
from massmerge.mass.budget import truncate
from massmerge.mass import router
from massmerge.merging import STATIC_MERGES, merge
from massmerge.task_vectors import task_vector

#: Training budgets per preset; ``ci`` is cut so the whole pipeline fits 10 minutes on 2 cores.
PRESET_FINETUNE = {
    "ci": FinetuneConfig(steps=60, batch_size=16, max_length=32),
    "default": FinetuneConfig(steps=100, batch_size=16, max_length=48),
    "wide": FinetuneConfig(steps=100, batch_size=16, max_length=48),
}


class SuiteConfig(BaseModel):
    """Everything a suite run depends on; the report records it whole."""

    model_config = ConfigDict(frozen=True)

    preset: str = "ci"
    tasks: tuple[str, ...] | None = None
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    finetune: FinetuneConfig | None = None
    routing_layer: str | None = None  # default: the first MLP matrix of block round(0.75 * depth)
    mass_layers: tuple[str, ...] = ()  # extra routing layers evaluated with the full MASS model
    eps: float | None = 0.3
    eta: float = 0.2
    top_k: int = 3
    alpha: float = 1.0
    rank_scale: float = 1.0  # MASS factors cut as `build --max-size` cuts them (mass/budget.py); 1 = design ranks
    methods: tuple[str, ...] = STATIC_MERGES
    seed: int = 0
    eval_batch_size: int = 64

    def finetune_config(self) -> FinetuneConfig:
        return self.finetune or PRESET_FINETUNE.get(self.preset, PRESET_FINETUNE["default"])


@dataclass
class TestBatches:
    """One task's test split, tokenized once into length-sorted batches reused by every method."""

    batches: list[dict[str, torch.Tensor]]
    labels: torch.Tensor  # in batch order


@dataclass
class Zoo:
    """The run's fixed material: tasks, heads, experts and test batches."""

    tasks: list[TaskData]
    heads: list[ZeroShotHead]
    experts: list[Any]
    tests: list[TestBatches]
    backbone: Backbone
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]


def default_routing_layer(model: nn.Module) -> str:
    """``encoder.layer.{round(0.75 * depth)}.intermediate.dense`` (design.md section 2, step 5)."""
    depth = int(model.config.num_hidden_layers)
    return f"encoder.layer.{round(0.75 * depth)}.intermediate.dense"


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _atomic_write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)


class EvalCache:
    """JSON results keyed by a hash of everything that shaped them, so a rerun skips finished work."""

    def __init__(self, root: Path, base_key: str) -> None:
        self.root, self.base_key = root / "evals", base_key

    def get_or_run(self, name: str, fn: Callable[[], dict[str, Any]], **settings: Any) -> dict[str, Any]:
        path = self.root / f"{name}-{_hash([self.base_key, name, settings])}.json"
        if path.exists():
            return json.loads(path.read_text())
        result = fn()
        _atomic_write(path, json.dumps(result))
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


def tokenize_tests(tasks: Sequence[TaskData], tokenizer: Any, max_length: int, batch_size: int) -> list[TestBatches]:
    """Tokenize every test split once, sorted by length so batches carry little padding."""
    out = []
    for task in tasks:
        order = sorted(range(len(task.test)), key=lambda i: len(task.test.texts[i]))
        chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        batches = [tokenize(tokenizer, [task.test.texts[i] for i in c], max_length) for c in chunks]
        out.append(TestBatches(batches, torch.tensor([task.test.labels[i] for i in order])))
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
    tests = tokenize_tests(tasks, backbone.tokenizer, ft.max_length, cfg.eval_batch_size)
    return Zoo(tasks, heads, experts, tests, backbone, timing)


# ----- scoring ---------------------------------------------------------------------------------------------------


@torch.inference_mode()
def test_features(model: nn.Module, tests: Sequence[TestBatches], which: Sequence[int] | None = None,
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
    """Each expert on its own test split (the normalizer of every other method)."""
    oracle: dict[str, float] = {}
    for t, expert in enumerate(zoo.experts):
        feats = test_features(_with_state(zoo, expert.state_dict()), zoo.tests, [t], label=f"expert {zoo.names[t]}")
        oracle.update(score_features(zoo, feats, max_logit=False)["oracle"])
    return {"oracle": oracle}


def _set_model(zoo: Zoo, mass: MASSModel, tasks: tuple[int, ...]) -> nn.Module:
    """The plain model ``theta_0 + alpha * TSV-M(tasks)``, built once per task set and reused over batches."""
    return _with_state(zoo, {**zoo.backbone.model.state_dict(), **mass.set_params(tasks)})


@torch.inference_mode()
def score_mass(zoo: Zoo, mass: MASSModel) -> dict[str, Any]:
    """MASS with the task hidden: routing, (task, class) accuracy, and the oracle head on the same features.

    Every test sample is routed first; then samples are grouped by their selected set S over the whole test
    run, so each S's merged weights are formed once (MASS's second pass, grouped as the model does per batch).
    """
    from massmerge.mass.model import group_by_task_set

    names, T = zoo.names, len(zoo.names)
    routed = []  # (task, batch index, probs, selected)
    for t, batch, i in progress.track([(t, b, i) for t in range(T) for i, b in enumerate(zoo.tests[t].batches)],
                                      "route MASS"):  # fmt: skip
        _, probs, selected = mass.route(batch)
        routed.append((t, i, probs, selected))
    members: dict[tuple[int, ...], list[tuple[int, int, torch.Tensor]]] = {}
    for t, i, _, selected in routed:
        for tasks, index in group_by_task_set(selected):
            members.setdefault(tasks, []).append((t, i, index))
    correct, oracle_correct = torch.zeros(T), torch.zeros(T)
    starts = {t: _batch_starts(zoo.tests[t]) for t in range(T)}
    for tasks, rows in progress.track(sorted(members.items()), "evaluate MASS per task set"):
        model = _set_model(zoo, mass, tasks)
        for t, i, index in rows:
            batch = {k: v[index] for k, v in zoo.tests[t].batches[i].items()}
            labels = zoo.tests[t].labels[starts[t][i] + index]
            feats = features(model, batch).float()
            winner, pred = ev.max_logit_predictions(feats, [zoo.heads[s] for s in tasks])
            correct[t] += float(((torch.tensor(tasks)[winner] == t) & (pred == labels)).sum())
            oracle_correct[t] += float((zoo.heads[t](feats).argmax(-1) == labels).sum())
    true = torch.cat([torch.full((len(p),), t) for t, _, p, _ in routed])
    top1 = torch.cat([p.argmax(-1) for _, _, p, _ in routed])
    sel = torch.cat([s for _, _, _, s in routed])
    confusion = ev.routing_confusion(true, top1, T)
    sizes = [len(zoo.tests[t].labels) for t in range(T)]
    routing = ev.routing_accuracy_per_task(confusion)
    return {
        "max_logit": {names[t]: float(correct[t]) / sizes[t] for t in range(T)},
        "oracle_head": {names[t]: float(oracle_correct[t]) / sizes[t] for t in range(T)},
        "routing_accuracy": {names[t]: routing[t] for t in range(T)},
        "confusion": confusion.tolist(),
        "selection_recall": {names[t]: ev.selection_recall(true[true == t], sel[true == t]) for t in range(T)},
        "mean_selected": float(sel.sum(1).float().mean()),
        "task_sets": len(members),
    }


def _batch_starts(tests: TestBatches) -> list[int]:
    """Offset of each batch's first sample in the task's label vector."""
    out, total = [], 0
    for batch in tests.batches:
        out.append(total)
        total += int(batch["input_ids"].shape[0])
    return out


def score_mass_task_given(zoo: Zoo, mass: MASSModel) -> dict[str, Any]:
    """MASS's second pass with the true task as the only selected task (routing made perfect)."""
    oracle = {}
    for t in range(len(zoo.names)):
        feats = test_features(_set_model(zoo, mass, (t,)), zoo.tests, [t], label=f"MASS task given {zoo.names[t]}")
        oracle[zoo.names[t]] = ev.oracle_head_accuracy(feats[t], zoo.heads[t], zoo.tests[t].labels)
    return {"oracle": oracle}


@torch.inference_mode()
def routing_sweep(zoo: Zoo, mass: MASSModel, layers: Sequence[str], cfg: SuiteConfig) -> list[dict[str, Any]]:
    """Top-1 routing accuracy and selection recall per candidate routing matrix, from one first pass.

    Every candidate's input is captured by hooks during a single forward of the first-pass model (its
    weights do not depend on the routing layer), mean-pooled over the attention mask, and routed against that
    matrix's task subspaces.
    """
    model = _with_state(zoo, {**zoo.backbone.model.state_dict(), **mass.first_pass_params()})
    pool = mean_pool()
    captured: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    current: dict[str, Any] = {}
    hooks = [model.get_submodule(layer).register_forward_pre_hook(
        lambda _m, args, layer=layer: captured[layer].append(pool(args[0], current["batch"]).float()))
        for layer in layers]  # fmt: skip
    true = []
    for t, tests in enumerate(zoo.tests):
        for batch in tests.batches:
            current["batch"] = batch
            model(**batch)
            true.append(torch.full((batch["input_ids"].shape[0],), t))
    for hook in hooks:
        hook.remove()
    true_t = torch.cat(true)
    rows = []
    for layer in layers:
        res = router.residuals(torch.cat(captured[layer]), mass.factors.routing_basis(f"{layer}.weight"))
        probs, selected = router.select(res, mode="topk", eta=cfg.eta, top_k=cfg.top_k, tau=1.0)
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


# ----- orchestration ---------------------------------------------------------------------------------------------


def _row(kind: str, accuracy: dict[str, float], expert: dict[str, float], **extra: Any) -> dict[str, Any]:
    normalized = ev.normalized_accuracy(accuracy, expert)
    return {"kind": kind, "accuracy": accuracy, "normalized": normalized, "avg_accuracy": ev.mean(accuracy),
            "avg_normalized": ev.mean(normalized), **extra}  # fmt: skip


def _task_vectors(zoo: Zoo) -> list[dict[str, torch.Tensor]]:
    base = zoo.backbone.model.state_dict()
    return [task_vector(base, expert.state_dict()) for expert in zoo.experts]


def _build_mass(zoo: Zoo, factors: ExpertFactors, cfg: SuiteConfig, layer: str) -> MASSModel:
    config = make_config(routing_layer=layer, eps=cfg.eps, eta=cfg.eta, top_k=cfg.top_k, alpha=cfg.alpha)
    return MASSModel(zoo.backbone.model, factors, zoo.heads, config, pool=mean_pool(), features=features)


def _throughput(zoo: Zoo, mass: MASSModel, max_length: int) -> dict[str, float]:
    """Samples/s of MASS and of one plain base forward on one mixed-task batch (tasks interleaved)."""
    texts = [task.test.texts[i] for i in range(16) for task in zoo.tasks][:64]
    batch = tokenize(zoo.backbone.tokenizer, texts, max_length)
    model = zoo.backbone.model

    def base() -> None:
        with torch.inference_mode():
            features(model, batch)

    plain = ev.throughput(base, len(texts))
    routed = ev.throughput(lambda: mass(batch), len(texts))
    return {"base_samples_per_s": plain, "mass_samples_per_s": routed, "ratio": routed / plain}


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


def _rank_scale_key(cfg: SuiteConfig) -> dict[str, float]:
    """The rank scale as a cache setting only when it cuts, so design-rank results keep their cache keys."""
    return {} if cfg.rank_scale == 1.0 else {"rank_scale": cfg.rank_scale}


def _mass_rows(zoo: Zoo, factors: ExpertFactors, cfg: SuiteConfig, cache: EvalCache, layer: str,
               expert: dict[str, float], storage: float) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:  # fmt: skip
    mass = _build_mass(zoo, factors, cfg, layer)
    settings = {"layer": layer, "eps": cfg.eps, "eta": cfg.eta, "top_k": cfg.top_k, "alpha": cfg.alpha,
                **_rank_scale_key(cfg)}
    hidden = cache.get_or_run("mass", lambda: score_mass(zoo, mass), **settings)
    given = cache.get_or_run("mass_task_given", lambda: score_mass_task_given(zoo, mass), **settings)
    suffix = "" if layer == cfg.routing_layer else f" @ {layer}"
    rows = {
        f"MASS (task given){suffix}": _row("oracle routing", given["oracle"], expert, storage_factor=storage),
        f"MASS oracle-head{suffix}": _row("oracle head", hidden["oracle_head"], expert, storage_factor=storage),
        f"MASS{suffix}": _row("task hidden", hidden["max_logit"], expert, storage_factor=storage),
    }
    details = {k: hidden.get(k) for k in ("routing_accuracy", "confusion", "selection_recall", "mean_selected", "task_sets")}
    return rows, {"layer": layer, **details}


def run_suite(cfg: SuiteConfig, *, data_root: Path | None = None, cache_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Run the whole suite and write report.json, report.md and the plots into ``out_dir``; return the report."""
    wall = time.perf_counter()
    zoo = build_zoo(cfg, data_root, cache_dir)
    layer = cfg.routing_layer or default_routing_layer(zoo.backbone.model)
    cfg = cfg.model_copy(update={"routing_layer": layer})
    cache = EvalCache(cache_dir, _hash([e.meta["key"] for e in zoo.experts] + [cfg.finetune_config().model_dump(),
                                        [t.test.texts for t in zoo.tasks]]))  # fmt: skip
    start = time.perf_counter()
    zero = cache.get_or_run("zero_shot", lambda: score_state(zoo, zoo.backbone.model.state_dict(), "zero-shot"))
    expert = cache.get_or_run("experts", lambda: score_experts(zoo))["oracle"]
    T = len(zoo.tasks)
    rows: dict[str, dict[str, Any]] = {
        "zero-shot": _row("oracle head", zero["oracle"], expert, storage_factor=1.0),
        "zero-shot max-logit": _row("task hidden", zero["max_logit"], expert, storage_factor=1.0),
        "experts": _row("oracle head", expert, expert, storage_factor=float(T)),
    }
    tvs = _task_vectors(zoo)
    rows.update(_static_rows(zoo, tvs, cfg, cache, expert))
    factor_start = time.perf_counter()
    factors = ExpertFactors.build(tvs, zoo.names, eps=cfg.eps)
    if cfg.rank_scale < 1.0:
        factors = truncate(factors, cfg.rank_scale)
    factor_seconds = time.perf_counter() - factor_start
    base_numel = sum(v.numel() for v in zoo.backbone.model.state_dict().values() if v.is_floating_point())
    storage = ev.storage_factor(base_numel + factors.numel(), base_numel)
    rows["tsv_c (task given)"] = _row("oracle head", _tsv_c_row(zoo, tvs, cache), expert, storage_factor=storage)
    mass_details = []
    for candidate in dict.fromkeys([layer, *cfg.mass_layers]):
        new_rows, details = _mass_rows(zoo, factors, cfg, cache, candidate, expert, storage)
        rows.update(new_rows)
        mass_details.append(details)
    mass = _build_mass(zoo, factors, cfg, layer)
    sweep = cache.get_or_run("routing_sweep", lambda: {"rows": routing_sweep(zoo, mass, sweep_layers(zoo.backbone.model), cfg)},
                             eta=cfg.eta, top_k=cfg.top_k, eps=cfg.eps, **_rank_scale_key(cfg))["rows"]  # fmt: skip
    timing = {**zoo.timing, "evaluate_seconds": time.perf_counter() - start, "factorize_seconds": factor_seconds,
              "total_seconds": time.perf_counter() - wall}  # fmt: skip
    from massmerge.suite_report import write_report

    report = {
        "preset": cfg.preset, "config": json.loads(cfg.model_dump_json()), "finetune": cfg.finetune_config().model_dump(),
        "tasks": [{"name": t.name, "description": t.description, "classes": t.classes, "sizes": t.sizes}
                  for t in zoo.tasks],
        "experts": {t.name: e.meta for t, e in zip(zoo.tasks, zoo.experts)},
        "methods": rows, "mass": mass_details[0], "mass_layers": mass_details,
        "dropped": factors.dropped(), "layer_sweep": sweep, "throughput": _throughput(zoo, mass, cfg.finetune_config().max_length),
        "storage": {"base_numel": base_numel, "mass_numel": base_numel + factors.numel(), "mass_factor": storage},
        "timing": timing,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    from massmerge.suite_report import targets

    report["targets"] = targets(report)
    write_report(report, out_dir)
    return report
