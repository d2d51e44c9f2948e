"""The one experiment runner: every method scored the same way on a task pool, for ``suite`` and ``evaluate``.

Flow (one way): a task pool (:mod:`.pool`) and a base model -> zero-shot, each expert on its own task, every
static merge (oracle head and max-logit heads) -> MASS, assembled exactly as ``massmerge build`` stores it
(:func:`massmerge.mass.build.assemble`) and served as ``massmerge predict`` serves it
(:func:`massmerge.mass.serving.serve`) -> report rows normalized by the experts on the same split.

Static weights run through ``torch.func.functional_call`` on the one base module (nothing is copied into a
second model); MASS runs the engine its parts build. Every result is cached under a key of everything that
shaped it (:class:`~massmerge.experiments.cache.EvalCache`), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from massmerge import progress
from massmerge.device import sync, to_device
from massmerge.experiments import metrics as ev
from massmerge.experiments.cache import BuildKey, EvalCache, MassKey, MergeKey, TaskGivenKey
from massmerge.experiments.pool import TaskPool
from massmerge.mass import router
from massmerge.mass.build import MASSParts
from massmerge.mass.config import ROUTER_PROFILES
from massmerge.mass.model import FeatureRunner, MASSModel
from massmerge.mass.serving import first_pass_batches, serve
from massmerge.mass.storage import dtype_name, float_dtype
from massmerge.merging import merge
from massmerge.smile import SmileSettings, build_smile, storage_factor

Params = Mapping[str, torch.Tensor]
ORACLE_CHUNK = 1024  # predictions whose routed features are read by their heads at once (score_mass)


def row(kind: str, accuracy: Mapping[str, float], expert: Mapping[str, float] | None, **extra: Any) -> dict[str, Any]:
    """One report row: absolute and normalized accuracy per task and averaged over tasks (unweighted)."""
    normalized = ev.normalized_accuracy(accuracy, expert) if expert else {}
    return {"kind": kind, "accuracy": dict(accuracy), "normalized": normalized, "avg_accuracy": ev.mean(accuracy),
            "avg_normalized": ev.mean(normalized), **extra}  # fmt: skip


# ----- static weights -----------------------------------------------------------------------------------------

@torch.inference_mode()
def split_features(pool: TaskPool, model: nn.Module, params: Params | None, which: Sequence[int] | None = None,
                   *, split: str = "test", label: str = "evaluate") -> dict[int, torch.Tensor]:
    """Final features of the splits of tasks ``which`` (default all) under ``params`` (None: the base's own)."""
    runner = FeatureRunner(model, pool.features)
    device, dtype = placement(model)
    swapped = {f"model.{key}": value.to(device=device, dtype=dtype if value.is_floating_point() else None)
               for key, value in (params or {}).items()}
    tasks = pool.split(split)
    which = list(range(pool.num_tasks)) if which is None else list(which)
    out: dict[int, list[torch.Tensor]] = {t: [] for t in which}
    for t in which:  # one progress stage per task: a long evaluation shows where it is
        for batch in progress.track(tasks[t].batches(), f"{label} {pool.names[t]}"):
            features = functional_call(runner, swapped, (to_device(batch, device, dtype),), strict=False)
            out[t].append(features.float().cpu())
    return {t: torch.cat(parts) for t, parts in out.items()}


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a model's floating parameters: where its inputs and swapped weights must go."""
    floating = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (floating.device, floating.dtype) if floating is not None else (torch.device("cpu"), torch.float32)


def score_features(pool: TaskPool, feats: Mapping[int, torch.Tensor], *, split: str = "test",
                   max_logit: bool = True) -> dict[str, Any]:
    """Per task: oracle-head accuracy and (when every task's features are there) max-logit accuracy."""
    names, tasks = pool.names, pool.split(split)
    out: dict[str, Any] = {"oracle": {names[t]: ev.oracle_head_accuracy(f, pool.heads[t], tasks[t].labels)
                                      for t, f in feats.items()}}
    if max_logit:
        out["max_logit"] = {names[t]: ev.max_logit_accuracy(f, pool.heads, t, tasks[t].labels)
                            for t, f in feats.items()}
    return out


def score_static(pool: TaskPool, model: nn.Module, params: Params | None, *, label: str) -> dict[str, Any]:
    """Oracle-head and max-logit (task hidden) accuracy of one set of weights on every task's test split."""
    return score_features(pool, split_features(pool, model, params, label=label))


def score_experts(pool: TaskPool, model: nn.Module, expert_params: Callable[[int], Params]) -> dict[str, Any]:
    """Each expert on its own task with its own head: the normalizers, on the test split and (when the pool has
    one) the validation split."""
    oracle, val = {}, {}
    for t, name in enumerate(pool.names):
        params = expert_params(t)
        feats = split_features(pool, model, params, [t], label="expert")
        oracle.update(score_features(pool, feats, max_logit=False)["oracle"])
        if "val" in pool.splits:
            val_feats = split_features(pool, model, params, [t], split="val", label="expert (val)")
            val.update(score_features(pool, val_feats, split="val", max_logit=False)["oracle"])
    return {"oracle": oracle, "val": val}


def static_rows(pool: TaskPool, model: nn.Module, base: Params, task_vectors: Callable[[], Sequence[Params]],
                methods: Sequence[str], cache: EvalCache, expert: Mapping[str, float],
                options: Callable[[str], dict[str, Any]] = lambda method: {}) -> dict[str, dict[str, Any]]:
    """Every static merge with the oracle head (``name``) and max-logit heads (``name max-logit``)."""
    rows: dict[str, dict[str, Any]] = {}
    for name in methods:
        opts = options(name)

        def run(name: str = name, opts: dict[str, Any] = opts) -> dict[str, Any]:
            start = time.perf_counter()
            state = merge(name, base, task_vectors(), **opts)
            seconds = time.perf_counter() - start
            return {**score_static(pool, model, state, label=f"evaluate {name}"), "merge_seconds": seconds}

        result = cache.get_or_run(name, run, MergeKey(options=opts))
        extra = {"options": opts} if opts else {}
        rows[name] = row("oracle head", result["oracle"], expert, merge_seconds=result["merge_seconds"],
                         storage_factor=1.0, **extra)  # fmt: skip
        rows[f"{name} max-logit"] = row("task hidden", result["max_logit"], expert, storage_factor=1.0)
    return rows


def tsv_c_accuracy(pool: TaskPool, model: nn.Module, base: Params, task_vectors: Callable[[], Sequence[Params]],
                   cache: EvalCache) -> dict[str, float]:
    """TSV-C: each task's rank-k reconstruction with the task known (the oracle compression bound)."""

    def run() -> dict[str, Any]:
        oracle: dict[str, float] = {}
        for t, name in enumerate(pool.names):
            feats = split_features(pool, model, merge("tsv_c", base, task_vectors(), task=t), [t],
                                   label="evaluate tsv_c")
            oracle.update(score_features(pool, feats, max_logit=False)["oracle"])
        return {"oracle": oracle}

    return cache.get_or_run("tsv_c", run)["oracle"]


# ----- MASS ---------------------------------------------------------------------------------------------------

@dataclass
class ServedMASS:
    """The MASS model an experiment scores, and what its stored factors cost."""

    mass: MASSModel
    storage: dict[str, Any]  # base_numel, factor_numel, base_dtype, factor_dtype, bytes_ratio, rank_scale
    build_key: BuildKey  # what the factors depend on beyond the experts (cache keys)
    factor_seconds: float

    def key(self, view: MASSModel | None = None) -> MassKey:
        """The cache key of a view of the served model (default: the model itself)."""
        return MassKey(build=self.build_key, serve=(view or self.mass).settings)


def serve_parts(model: nn.Module, parts: MASSParts, mass: MASSModel, factor_seconds: float) -> ServedMASS:
    """The served model of assembled parts with its storage figures (the artifact ``build`` would write)."""
    state = model.state_dict()
    base_numel = sum(v.numel() for v in state.values() if v.is_floating_point())
    storage = {"base_numel": base_numel, "factor_numel": parts.factors.numel(),
               "base_dtype": dtype_name(float_dtype(state)), "factor_dtype": dtype_name(parts.store),
               "bytes_ratio": parts.size_factor, "rank_scale": parts.rank_scale}
    build_key = BuildKey(eps=parts.build.eps, rank_scale=parts.rank_scale, factor_dtype=storage["factor_dtype"])
    return ServedMASS(mass, storage, build_key, factor_seconds)


def _served_items(pool: TaskPool, split: str) -> tuple[Iterator[Any], torch.Tensor, torch.Tensor]:
    """Every task's items in task order as ONE lazy stream (never a list: a real test set is tens of GiB once
    preprocessed), with each item's true task and label."""
    tasks = pool.split(split)
    items = (item for task in tasks for item in task.items())
    true = torch.cat([torch.full((task.size,), t) for t, task in enumerate(tasks)])
    return items, true, torch.cat([task.labels for task in tasks])


def _collect(predictions: Iterable[Any], heads: Sequence[nn.Module], true: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(task, label, probs, selected, oracle-head label) of a prediction stream, a window at a time: each
    input's routed features are read by its true task's head as they come and then dropped, so nothing kept
    grows with the feature width."""
    task, label, probs, selected, oracle = [], [], [], [], []
    window: list[Any] = []

    def flush() -> None:
        features = torch.stack([p.features for p in window])
        rows = torch.tensor([p.index for p in window])
        owner = true[rows]
        guess = torch.empty(len(window), dtype=torch.long)
        for t in owner.unique().tolist():
            mask = owner == t
            guess[mask] = ev.logits(heads[t], features[mask]).argmax(-1).cpu()
        oracle.append(guess)
        window.clear()

    for p in predictions:
        task.append(p.task)
        label.append(p.label)
        probs.append(p.probs)
        selected.append(p.selected)
        window.append(p)
        if len(window) == ORACLE_CHUNK:
            flush()
    if window:
        flush()
    return (torch.tensor(task), torch.tensor(label), torch.stack(probs).cpu(), torch.stack(selected).cpu(),
            torch.cat(oracle))


@torch.inference_mode()
def score_mass(pool: TaskPool, mass: MASSModel, split: str = "test", label: str = "MASS") -> dict[str, Any]:
    """MASS with the task hidden, served as ``massmerge predict`` serves (every task's items in one stream):
    strict (task, class) accuracy and where it loses.

    Per task: routing top-1, the true task among the selected (``selection_recall``), the final task choice,
    the class given the right task, the true task's head on the routed features (``oracle_head``), the routing
    confusion, and the wall time per input of the whole served call.
    """
    names, T = pool.names, pool.num_tasks
    items, true, labels = _served_items(pool, split)
    start = time.perf_counter()
    stream = progress.track(serve(mass, items, pool.collate, batch_size=mass.settings.batch_size,
                                  size_of=pool.size_of, return_features=True), f"{label} ({split})", total=len(true))
    task, label_pred, probs, selected, oracle = _collect(stream, pool.heads, true)
    seconds = time.perf_counter() - start
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
        "task_sets": len({tuple(r.nonzero().flatten().tolist()) for r in selected}),
        "seconds_per_input": seconds / len(true), "correct": correct.int().tolist(),
    }


@torch.inference_mode()
def score_mass_task_given(pool: TaskPool, mass: MASSModel, split: str = "test") -> dict[str, Any]:
    """MASS's second pass with the true task as the only selected task (routing made perfect); ``correct``:
    per input, in task order (the order :func:`score_mass` serves them)."""
    oracle, correct = {}, []
    for t, (name, task) in enumerate(zip(pool.names, pool.split(split))):
        right = []
        for batch in progress.track(task.batches(), f"MASS task given {name}"):
            out = mass(batch, task=t)
            start = sum(len(r) for r in right)
            right.append(out.label.cpu() == task.labels[start:start + len(out.label)])
        hits = torch.cat(right)
        oracle[name] = float(hits.float().mean())
        correct += hits.int().tolist()
    return {"oracle": oracle, "correct": correct}


@torch.inference_mode()
def score_mass_batch_routing(pool: TaskPool, mass: MASSModel, split: str = "test") -> dict[str, Any]:
    """The paper's batch routing: each batch holds one task's inputs and is routed once (``mode="batch"``:
    residuals averaged over the batch, one task set for all of it); strict (task, class) accuracy per task."""
    view = mass.with_settings(mode="batch")
    accuracy = {}
    for t, (name, task) in enumerate(zip(pool.names, pool.split(split))):
        correct, start = 0, 0
        for batch in progress.track(task.batches(), f"MASS batch routing {name}"):
            out = view(batch)
            labels = task.labels[start:start + len(out.label)]
            correct += int(((out.task.cpu() == t) & (out.label.cpu() == labels)).sum())
            start += len(out.label)
        accuracy[name] = correct / task.size
    return {"accuracy": accuracy, "batch_size": view.settings.batch_size}


def mass_scores(pool: TaskPool, served: ServedMASS, mass: MASSModel, cache: EvalCache
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(task hidden, task given) test scores of a MASS view, with their per-input correctness, cached."""
    hidden = cache.get_or_run("mass", lambda: score_mass(pool, mass), served.key(mass))
    given = cache.get_or_run("mass_task_given", lambda: score_mass_task_given(pool, mass),
                             TaskGivenKey(build=served.build_key, alpha=mass.settings.alpha))
    return hidden, given


def batch_routing_row(pool: TaskPool, served: ServedMASS, cache: EvalCache, expert: Mapping[str, float]
                      ) -> dict[str, Any]:
    """The paper's batch-routing row: one routing per single-task batch (:func:`score_mass_batch_routing`)."""
    result = cache.get_or_run("mass_batch_routing", lambda: score_mass_batch_routing(pool, served.mass), served.key())
    return row("batch routing", result["accuracy"], expert, storage_factor=served.storage["bytes_ratio"],
               batch_size=result["batch_size"])


def mass_rows(pool: TaskPool, served: ServedMASS, mass: MASSModel, cache: EvalCache, expert: Mapping[str, float],
              suffix: str = "") -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The MASS rows (task given, oracle head on routed features, task hidden) and the routing details."""
    hidden, given = mass_scores(pool, served, mass, cache)
    storage = served.storage["bytes_ratio"]
    rows = {
        f"MASS (task given){suffix}": row("oracle routing", given["oracle"], expert, storage_factor=storage),
        f"MASS oracle-head{suffix}": row("oracle head", hidden["oracle_head"], expert, storage_factor=storage),
        f"MASS{suffix}": row("task hidden", hidden["max_logit"], expert, storage_factor=storage),
    }
    keys = ("routing_accuracy", "selection_recall", "task_choice", "class_given_task", "confusion",
            "mean_selected", "task_sets")
    return rows, {"layer": mass.settings.routing_layers[-1], **{k: hidden[k] for k in keys}}


@torch.inference_mode()
def routing_sweep(pool: TaskPool, mass: MASSModel, layers: Sequence[str], split: str = "test") -> list[dict[str, Any]]:
    """Top-1 routing accuracy and selection recall per candidate routing matrix, from one first pass.

    Every candidate's input is captured in a single first pass (its weights do not depend on the routing
    layer), pooled as the served model pools (the engine's own residuals), and routed by the paper's rule
    against that matrix's subspaces.
    """
    view = mass.with_settings(routing_layers=tuple(layers))
    s = mass.settings
    residuals: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    true = []
    for t, task in enumerate(pool.split(split)):
        for batch in task.batches():
            by_layer = view.layer_residuals(batch)
            for layer, res in by_layer.items():
                residuals[layer].append(res.cpu())
            true.append(torch.full((int(res.shape[0]),), t))
    true_t = torch.cat(true)
    rows = []
    for layer in layers:
        probs, selected = router.select(torch.cat(residuals[layer]), mode="topk", eta=s.eta, top_k=s.top_k, tau=s.tau)
        conf = ev.routing_confusion(true_t, probs.argmax(-1), pool.num_tasks)
        per_task = dict(zip(pool.names, ev.routing_accuracy_per_task(conf)))
        rows.append({"layer": layer, "routing_accuracy": per_task, "mean": ev.mean(per_task),
                     "selection_recall": ev.selection_recall(true_t, selected)})  # fmt: skip
    return rows


def router_variants(adapter: Any, model: nn.Module, layer: str) -> dict[str, dict[str, Any]]:
    """Serve-setting variants of the router ablation (issue 9): the paper's rule, each data-free change alone,
    and all of them together (the text family's default router, ``TextEncoderAdapter.default_router``).

    Multi-layer routing uses every linear layer the first pass computes before it stops at ``layer``
    (``evidence_layers``), so it costs no extra forward; ``ppca`` adds the layers' log-likelihoods and, being
    sharp, selects one task almost always.
    """
    paper = {**ROUTER_PROFILES["paper"], "routing_layers": (layer,), "pooling": adapter.paper_pooling}
    several = adapter.evidence_layers(model, layer)
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


def ablation_rows(pool: TaskPool, served: ServedMASS, variants: Mapping[str, Mapping[str, Any]], cache: EvalCache,
                  expert: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """Every router variant on the validation split (where defaults are chosen) and the test split."""
    rows = []
    for name, overrides in variants.items():
        view = served.mass.with_settings(**overrides)
        for split in ("val", "test"):
            result = cache.get_or_run(f"ablation-{split}", lambda v=view, s=split: score_mass(pool, v, s, name),
                                      served.key(view))
            normalized = ev.normalized_accuracy(result["max_logit"], expert[split])
            rows.append({"name": name, "settings": {k: overrides[k] for k in sorted(overrides)}, "split": split,
                         "accuracy": result["max_logit"], "normalized": normalized,
                         "avg_normalized": ev.mean(normalized), "routing_accuracy": result["routing_accuracy"],
                         "seconds_per_input": result["seconds_per_input"]})
    return rows


def frontier_rows(pool: TaskPool, model: nn.Module, served: ServedMASS, adapter: Any, blocks: Sequence[int],
                  cache: EvalCache, expert: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """The cost/accuracy frontier of issue 21: for each routing block l (the family's router exiting at block
    l's routing matrix) and each restart block j from 0 to l, normalized accuracy with the task hidden on the
    validation and test splits, and throughput against a plain forward measured in the same run. Costs in
    forwards: about ``(l + 1 + L - j) / L`` (the first pass runs into block l; ``j = 0`` recomputes all)."""
    depth = len(adapter.block_names(model))
    multi = len(served.mass.settings.routing_layers) > 1
    rows = []
    for block in blocks:
        layer = adapter.block_routing_layer(model, block)
        layers = adapter.evidence_layers(model, layer) if multi else (layer,)
        for restart in range(block + 1):
            view = served.mass.with_settings(routing_layers=layers, restart_block=restart)
            found: dict[str, Any] = {"routing_layer": layer, "routing_block": block, "restart_block": restart,
                                     "cost": (block + 1 + depth - restart) / depth}
            for split in ("val", "test"):
                result = cache.get_or_run(f"frontier-{split}", lambda v=view, s=split: score_mass(pool, v, s, "MASS"),
                                          served.key(view))
                normalized = ev.normalized_accuracy(result["max_logit"], expert[split])
                found[split] = {"avg_normalized": ev.mean(normalized), "normalized": normalized,
                                "accuracy": result["max_logit"]}
            found["throughput"] = throughput(pool, model, view)["ratio"]
            rows.append(found)
    return rows


def mixed_inputs(pool: TaskPool, count: int, batch_size: int) -> tuple[list[Any], list[list[int]]]:
    """``count`` test inputs of mixed tasks in a seeded order, and the size-sorted windows ``serve`` batches
    its first pass in (so a plain forward pads exactly as the served model does)."""
    order = list(range(sum(task.size for task in pool.split("test"))))
    random.Random(0).shuffle(order)  # the permutation depends on the length only: as shuffling the items
    picked = {index: rank for rank, index in enumerate(order[:count])}
    items: list[Any] = [None] * len(picked)
    stream = (item for task in pool.split("test") for item in task.items())
    for index, item in enumerate(stream):  # one pass; only the picked inputs are kept
        if index in picked:  # a copy: a row of a decoded batch would keep the whole batch alive
            items[picked[index]] = item.clone() if isinstance(item, torch.Tensor) else item
    sizes = [pool.size_of(item) for item in items] if pool.size_of else [0] * len(items)
    return items, first_pass_batches(sizes, batch_size, pool.num_tasks)


def forward_runner(pool: TaskPool, model: nn.Module, items: Sequence[Any], batches: Sequence[Sequence[int]]
                   ) -> Callable[[], None]:
    """A call that runs ``model`` to the features over ``items`` in ``batches`` (and waits for the device)."""
    device, dtype = placement(model)

    def run() -> None:
        with torch.inference_mode():
            for rows in batches:
                pool.features(model, to_device(pool.collate([items[i] for i in rows]), device, dtype))
        sync(device)

    return run


def throughput(pool: TaskPool, model: nn.Module, mass: MASSModel, count: int = 512) -> dict[str, Any]:
    """Inputs/s of the served MASS model (:func:`~massmerge.mass.serving.serve`, as ``massmerge predict``) and of
    the plain base forward to the features, on the same ``count`` test inputs of mixed tasks, same batch size."""
    size = mass.settings.batch_size
    items, batches = mixed_inputs(pool, count, size)

    def served() -> None:
        list(serve(mass, items, pool.collate, batch_size=size, size_of=pool.size_of))
        sync(mass.device)

    plain = ev.throughput(forward_runner(pool, model, items, batches), len(items), repeats=1)
    routed = ev.throughput(served, len(items), repeats=1)
    return {"base_samples_per_s": plain, "mass_samples_per_s": routed, "ratio": routed / plain,
            "path": f"massmerge.mass.serving.serve (what massmerge predict runs), {len(items)} test inputs of mixed "
                    f"tasks in input order, batch {size}, warm caches; base: forward to the features, batched as "
                    "serve batches its first pass (size-sorted windows)"}


def forward_ratio(pool: TaskPool, model: nn.Module, other: nn.Module, batch_size: int, count: int = 512) -> float:
    """Throughput of ``other``'s forward over the plain ``model``'s, same mixed inputs and batches, one run."""
    items, batches = mixed_inputs(pool, count, batch_size)
    plain = ev.throughput(forward_runner(pool, model, items, batches), len(items), repeats=1)
    return ev.throughput(forward_runner(pool, other, items, batches), len(items), repeats=1) / plain


# ----- SMILE ----------------------------------------------------------------------------------------------------

def smile_rows(pool: TaskPool, model: nn.Module, task_vectors: Callable[[], Sequence[Params]], cache: EvalCache,
               expert: Mapping[str, float], settings: SmileSettings, batch_size: int) -> dict[str, dict[str, Any]]:
    """SMILE with the oracle head (as the paper reports it) and with max-logit heads (task hidden), its storage
    over the base's and its serving throughput over a plain forward (:func:`forward_ratio`)."""
    name = f"SMILE-{settings.top_k}"

    def run() -> dict[str, Any]:
        start = time.perf_counter()
        smile = build_smile(model, task_vectors(), settings)
        seconds = time.perf_counter() - start
        scores = score_static(pool, smile, None, label=f"evaluate {name}")
        return {**scores, "merge_seconds": seconds, "storage_factor": storage_factor(smile, model),
                "serving_ratio": forward_ratio(pool, model, smile, batch_size)}

    result = cache.get_or_run("smile", run, settings)
    costs = {"storage_factor": result["storage_factor"], "serving_ratio": result["serving_ratio"]}
    return {name: row("oracle head", result["oracle"], expert, merge_seconds=result["merge_seconds"], **costs),
            f"{name} max-logit": row("task hidden", result["max_logit"], expert, **costs)}


__all__ = ["ServedMASS", "ablation_rows", "batch_routing_row", "forward_ratio", "forward_runner", "frontier_rows",
           "mass_rows", "mass_scores", "mixed_inputs", "score_mass_batch_routing", "smile_rows", "router_variants", "routing_sweep", "row",
           "score_experts", "score_features", "score_mass", "score_mass_task_given", "score_static", "serve_parts",
           "split_features", "static_rows", "throughput", "tsv_c_accuracy"]
