"""``massmerge evaluate`` for experts that generate: Flan-T5 on GLUE by FusionBench's protocol, static rows.

Flow: the config (``family: seq2seq``) -> the base ``T5ForConditionalGeneration`` and its tokenizer -> each
task's GLUE split as prompts and target strings (:mod:`massmerge.data.glue`) -> rows: the pretrained model, each
expert on its own task, and the static merges (Task Arithmetic, TIES, TSV-M ... through
:func:`massmerge.merging.merge`) -> greedy ``generate(max_length=10)`` over prompts padded to 512, streamed in
batches -> exact match, or Spearman over the whole STS-B split (:mod:`.glue_metrics`) -> report.json and
report.md, normalized by the experts on the same split.

Weights are swapped into the one base model in place and put back after each row (no second model in memory).
Every (row, task) score is cached under the run's key, the protocol and the row's options, so an interrupted
run resumes.

MASS rows (method ``mass``): the experts' factors over the same base (full fine-tunes streamed, LoRA exact),
cut to the size budget and rounded to their storage dtype exactly as ``massmerge build`` stores them
(:func:`massmerge.mass.build.assemble`: what is scored is what is shipped), each prompt routed in the encoder
and generated under its own task set (:meth:`MASSModel.generate`), by the same protocol; two rows, ``MASS`` (the masked mean over the prompt's real tokens, the default) and ``MASS
(unmasked pooling)`` (the official code's mean over all 512 padded positions, for parity). Their serve settings
come from the config's ``mass:`` section over the family's default router, and key their cache entries.

SMILE row (method ``smile``, row ``SMILE-2``): FusionBench's SMILE upscaling of the whole T5 (every encoder,
decoder and LM-head ``nn.Linear`` a task changed becomes a per-token top-2 mixture of rank-k experts,
:func:`massmerge.smile.build_smile` with :class:`~massmerge.smile.SmileSettings`' defaults), built once on a copy
of the base and run by the same greedy ``generate()``: every token, prompt and decode step, routes on its own.
Full fine-tunes are read as streamed task vectors; LoRA experts as their dense ``scale B A`` per adapted matrix
(FusionBench merges each adapter into the base before upscaling: the same deltas). Cached per task under every
SMILE setting and the kind of expert.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from massmerge import progress
from massmerge.adapters.lora import LoraExpert
from massmerge.adapters.seq2seq import Seq2SeqAdapter, load_full_expert, load_lora_seq2seq, tied_aliases
from massmerge.data.glue import MAX_INPUT_LENGTH, MAX_LENGTH, PROTOCOL, GlueSplit, check_task, read_glue_split
from massmerge.device import describe as describe_device
from massmerge.device import resolve_device, resolve_dtype
from massmerge.errors import MassMergeError, OptionError
from massmerge.experiments.cache import CacheKey, EvalCache
from massmerge.experiments.glue_metrics import score_task
from massmerge.io.atomic import write_text_atomically
from massmerge.mass.config import ServeSettings
from massmerge.merging import merge
from massmerge.sources import resolve_source
from massmerge.task_vectors import CheckedTaskVector, add_delta

Log = Callable[[str], None]
GENERATION_METHODS = ("zeroshot", "experts", "task_arithmetic", "ties", "tsv_m", "smile", "mass")
MASS_ROWS = {"MASS": "mean", "MASS (unmasked pooling)": "unmasked_mean"}  # row -> routing pooling
MASS_REVISION = 2  # 2: the rows score build's stored parts (budget cut, storage rounding); 1 scored raw factors
NOT_YET: dict[str, str] = {}  # method -> what it needs to run with seq2seq (none left)
REPORT_KIND = "evaluate-generate"


@dataclass
class GenerationBench:
    """Everything loaded once: the base model and tokenizer, the tasks' splits, the experts' sources."""

    config: Any
    model: nn.Module
    tokenizer: Any
    base_state: dict[str, torch.Tensor]
    splits: list[GlueSplit]
    targets: list[list[str]]
    lora: list[LoraExpert] | None
    log: Log

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.config.tasks]


def methods_of(config: Any) -> list[str]:
    """The rows to run: the config's methods (default: every one, SMILE and MASS included); a method of
    :data:`NOT_YET` is refused in one line."""
    methods = list(config.methods) if "methods" in config.model_fields_set else list(GENERATION_METHODS)
    for method in methods:
        if method in NOT_YET:
            raise OptionError(f"methods: '{method}' cannot run with family seq2seq yet: it needs {NOT_YET[method]}; "
                              "drop it from methods")
    return methods


def glue_task(spec: Any, index: int) -> str:
    """The GLUE task a config task names: its ``subset`` (the dataset's configuration), else its name."""
    return check_task(spec.subset or spec.name, f"tasks.{index}.subset" if spec.subset else f"tasks.{index}.name")


def prepare(config: Any, *, log: Log = print) -> GenerationBench:
    """Load the base, the tokenizer, every split (only the named split's files) and the LoRA experts if any."""
    from transformers import AutoTokenizer

    tasks = [glue_task(t, i) for i, t in enumerate(config.tasks)]
    log(f"loading base {config.base}")
    model = Seq2SeqAdapter().load_model(config.base, revision=config.revision, trust_pickle=config.trust_pickle)
    tokenizer_dir = resolve_source(config.tokenizer or config.base, None if config.tokenizer else config.revision)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    keys = Seq2SeqAdapter().encoder_keys(model)
    state = model.state_dict()
    base_state = {k: state[k].detach().clone() for k in keys}
    splits = []
    for spec, task in zip(config.tasks, tasks, strict=True):
        split = spec.split if "split" in spec.model_fields_set else None  # default: the protocol's split
        log(f"loading {spec.dataset} {task} ({split or 'protocol split'})")
        data = read_glue_split(spec.dataset, task, split=split, max_samples=config.eval.max_samples,
                               seed=config.eval.seed)
        splits.append(data)
    targets = [decoded_targets(tokenizer, s.targets) for s in splits]
    return GenerationBench(config, model, tokenizer, base_state, splits, targets, _lora(config, model), log)


def _lora(config: Any, model: nn.Module) -> list[LoraExpert] | None:
    paths = [resolve_source(t.expert, t.expert_revision) for t in config.tasks]
    is_lora = [(p / "adapter_config.json").is_file() for p in paths]
    if not any(is_lora):
        return None
    if not all(is_lora):
        raise OptionError("tasks: mix of LoRA adapters and full checkpoints; use one kind of expert")
    return [load_lora_seq2seq(str(p), model, base=config.base, trust_pickle=config.trust_pickle) for p in paths]


# ----- the protocol's generation --------------------------------------------------------------------------------

def encode(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """FusionBench's tokenizer call: padded to 512 ('max_length') and truncated there."""
    return dict(tokenizer(list(prompts), padding="max_length", max_length=MAX_INPUT_LENGTH, truncation=True,
                          return_tensors="pt"))


def decoded_targets(tokenizer: Any, targets: Sequence[str]) -> list[str]:
    """Each target as FusionBench compares it: tokenized like the inputs, special and pad ids dropped, decoded."""
    special = set(tokenizer.all_special_ids)
    out = []
    for text in targets:
        ids = tokenizer(text, padding="max_length", max_length=MAX_INPUT_LENGTH, truncation=True)["input_ids"]
        out.append(tokenizer.decode([i for i in ids if i not in special and i > 0], skip_special_tokens=True))
    return out


@torch.inference_mode()
def generate_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, batch_size: int,
                   label: str = "generate", routed: Any = None) -> list[str]:
    """Greedy ``generate(max_length=10)`` of every prompt, in batches, decoded without special tokens
    (``routed``: a MASS model over ``model``, each prompt routed and generated under its task set)."""
    device = next(model.parameters()).device
    outputs: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in progress.track(starts, label, total=len(starts)):
        batch = encode(tokenizer, prompts[start:start + batch_size])
        batch = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        options = {"max_length": MAX_LENGTH, "do_sample": False, "num_beams": 1}
        ids = routed.generate(batch, **options).sequences if routed is not None else model.generate(**batch, **options)
        outputs.extend(tokenizer.batch_decode(ids, skip_special_tokens=True))
    return outputs


@contextmanager
def weights(model: nn.Module, base: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None
            ) -> Iterator[nn.Module]:
    """``model`` with ``params`` copied into its tensors (and into the aliases of a tied one), the base's put
    back on exit."""
    own = model.state_dict(keep_vars=True)
    copies: dict[str, list[str]] = {}
    for alias, first in tied_aliases(model).items():
        copies.setdefault(first, []).append(alias)

    def put(values: Mapping[str, torch.Tensor], keys: Iterable[str]) -> None:
        with torch.no_grad():
            for key in keys:
                for name in (key, *copies.get(key, ())):
                    own[name].copy_(values[key])

    try:
        put(params or {}, list(params or {}))
        yield model
    finally:
        put(base, list(params or {}))


def score_one(bench: GenerationBench, task: int, params: Mapping[str, torch.Tensor] | None, label: str
              ) -> dict[str, Any]:
    """One task's score under ``params`` (None: the base)."""
    split = bench.splits[task]
    with weights(bench.model, bench.base_state, params) as model:
        outputs = generate_texts(model, bench.tokenizer, split.prompts, batch_size=bench.config.eval.batch_size,
                                 label=f"{label} {bench.names[task]}")
    return score_task(split.task, outputs, bench.targets[task]).as_dict()


# ----- rows -------------------------------------------------------------------------------------------------

def expert_vector(bench: GenerationBench, task: int) -> Mapping[str, torch.Tensor]:
    """Task vector of expert ``task``: lazy ``expert - base`` of a full fine-tune, or LoRA's dense ``scale B A``."""
    if bench.lora is not None:
        return bench.lora[task].task_vector(bench.base_state)
    spec = bench.config.tasks[task]
    expert = load_full_expert(spec.expert, bench.model, revision=spec.expert_revision,
                              trust_pickle=bench.config.trust_pickle)
    return CheckedTaskVector(bench.base_state, expert, name=spec.expert)


def expert_params(bench: GenerationBench, task: int) -> dict[str, torch.Tensor]:
    """The expert's own weights (base + delta, cast back to the base's dtype)."""
    vector = expert_vector(bench, task)
    return {key: add_delta(bench.base_state[key], vector[key]) for key in vector}


class GenerationScoreKey(CacheKey):
    """What one cached score of a generation row depends on beyond the run's key: the task, the protocol and the
    method's options."""

    task: str
    protocol: Any
    options: dict[str, Any]


def method_row(bench: GenerationBench, cache: EvalCache, method: str,
               params: Callable[[int], Mapping[str, torch.Tensor] | None], options: Mapping[str, Any]
               ) -> dict[str, dict[str, Any]]:
    """Per task the cached score of ``method``; ``params(task)`` is called only for tasks not cached yet."""
    out = {}
    for task, name in enumerate(bench.names):
        bench.log(f"method {method} on {name}")
        out[name] = cache.get_or_run(f"generate-{method}", lambda task=task: score_one(bench, task, params(task), method),
                                     GenerationScoreKey(task=name, protocol=PROTOCOL, options=dict(options)))
    return out


def merged_params(bench: GenerationBench, method: str, options: Mapping[str, Any]
                  ) -> Callable[[int], Mapping[str, torch.Tensor]]:
    """A static merge of every expert, computed once on first use."""
    memo: dict[str, Mapping[str, torch.Tensor]] = {}

    def get(_task: int) -> Mapping[str, torch.Tensor]:
        if "state" not in memo:
            bench.log(f"merging {method}")
            vectors = [expert_vector(bench, t) for t in range(len(bench.names))]
            memo["state"] = merge(method, bench.base_state, vectors, **options)
        return memo["state"]

    return get


def summarize(scores: Mapping[str, Mapping[str, Any]], expert: Mapping[str, Mapping[str, Any]] | None,
              **extra: Any) -> dict[str, Any]:
    """A report row: per task value (None when undefined), averages over the tasks and normalized by the experts."""
    values = {task: s["value"] for task, s in scores.items()}
    defined = [v for v in values.values() if v is not None]
    normalized = {}
    for task, value in values.items():
        ref = None if expert is None else expert[task]["value"]
        if value is not None and ref is not None and ref > 0:
            normalized[task] = value / ref
    notes = {task: s["note"] for task, s in scores.items() if s.get("note")}
    return {"scores": values, "metrics": {t: s["metric"] for t, s in scores.items()},
            "counts": {t: s["count"] for t, s in scores.items()}, "notes": notes,
            "avg": sum(defined) / len(defined) if len(defined) == len(values) and values else None,
            "avg_defined": sum(defined) / len(defined) if defined else None, "defined": len(defined),
            "normalized": normalized,
            "avg_normalized": (sum(normalized.values()) / len(normalized)
                               if len(normalized) == len(values) and values else None), **extra}


def run_generation_benchmark(config: Any, *, cache: EvalCache, log: Log = print) -> dict[str, Any]:
    """Every configured row by the protocol; returns the report (not yet written)."""
    wall = time.perf_counter()
    methods = methods_of(config)
    bench = prepare(config, log=log)
    device = resolve_device(config.eval.device)
    log(f"device: {describe_device(device)}")
    bench.model.to(device=device, dtype=resolve_dtype(config.eval.dtype))  # the base state stays on the CPU
    expert = method_row(bench, cache, "experts", lambda t: expert_params(bench, t), {})
    rows: dict[str, dict[str, Any]] = {}
    if "zeroshot" in methods:
        rows["pretrained"] = summarize(method_row(bench, cache, "pretrained", lambda t: None, {}), expert)
    rows["experts"] = summarize(expert, expert)
    for method in [m for m in methods if m not in ("zeroshot", "experts", "smile", "mass")]:
        options = config.merge_options(method)
        scores = method_row(bench, cache, method, merged_params(bench, method, options), options)
        rows[method] = summarize(scores, expert, **({"options": options} if options else {}))
    if "smile" in methods:  # before MASS: it copies the plain base
        rows.update(smile_rows(bench, cache, expert))
    if "mass" in methods:  # last: it installs the routed modules into the one base model (exact outside a pass)
        rows.update(mass_rows(bench, cache, expert))
    return {
        "kind": REPORT_KIND, "schema_version": 1, "protocol": PROTOCOL,
        "config": config.model_dump(mode="json"),
        "tasks": [{"name": n, "glue_task": s.task, "split": s.split, "size": len(s), "files": list(s.files),
                   "expert": t.expert, "dataset": t.dataset}
                  for n, s, t in zip(bench.names, bench.splits, config.tasks, strict=True)],
        "methods": rows, "reference": [figure.model_dump(mode="json") for figure in config.reference],
        "not_yet_runnable": {m: f"needs {why}" for m, why in NOT_YET.items()},
        "timing": {"total_seconds": time.perf_counter() - wall}, "device": describe_device(device),
    }


# ----- MASS rows ---------------------------------------------------------------------------------------------

def mass_factors(bench: GenerationBench) -> Any:
    """The experts' factors as ``massmerge build`` makes them for seq2seq (full: streamed task vectors; LoRA:
    exact factors), with the config's rank fraction and eps."""
    from massmerge.adapters.seq2seq import lora_seq2seq_factors, seq2seq_factors

    mass = bench.config.mass
    if bench.lora is not None:
        shapes = {k: tuple(v.shape) for k, v in bench.base_state.items()}
        return lora_seq2seq_factors(bench.lora, bench.names, shapes, rank_fraction=mass.rank_fraction, eps=mass.eps)
    vectors = (expert_vector(bench, t) for t in range(len(bench.names)))
    return seq2seq_factors(vectors, bench.names, rank_fraction=mass.rank_fraction, eps=mass.eps)


def mass_parts(bench: GenerationBench) -> Any:
    """The MASS parts ``massmerge build`` would store from these experts and the config's ``mass:`` build options
    (:func:`massmerge.artifact.build.build_generating`'s path): the factors cut to the size budget and rounded to
    their storage dtype, the family's default router (the official layer, or the first factored linear of its
    block) over the kept factors, the model's positions as the served length."""
    from massmerge.artifact.manifest import factor_header_bytes
    from massmerge.mass.build import assemble
    from massmerge.mass.config import BuildSettings

    mass = bench.config.mass
    build = BuildSettings(rank_fraction=mass.rank_fraction, eps=mass.eps, max_size=mass.max_size)
    factors = mass_factors(bench)
    adapter = Seq2SeqAdapter(routing_layer=bench.config.routing_layer).bind(bench.model)
    layer = adapter.routing_layer_for(bench.model, factors.matrices)
    return assemble(bench.model, factors, bench.names, [], build=build,
                    router=adapter.default_router(bench.model, layer), header_bytes=factor_header_bytes,
                    max_length=getattr(bench.model.config, "n_positions", None))


def mass_settings(bench: GenerationBench, serve: ServeSettings, pooling: str) -> ServeSettings:
    """The serve settings of a MASS row: the stored parts' (``serve``: the family's default router), the
    config's ``mass:`` overrides, this row's pooling."""
    from massmerge.experiments.evaluate_config import SERVE_SET_ELSEWHERE

    overrides = {k: v for k, v in bench.config.mass.model_dump().items()
                 if v is not None and k in ServeSettings.model_fields and k not in SERVE_SET_ELSEWHERE}
    return serve.updated(**{**overrides, "pooling": pooling})


def mass_rows(bench: GenerationBench, cache: EvalCache, expert: Mapping[str, Mapping[str, Any]]
              ) -> dict[str, dict[str, Any]]:
    """The MASS rows (:data:`MASS_ROWS`), each task cached; the factors are made only when a score is missing."""
    memo: dict[str, Any] = {}
    mass_opts = bench.config.mass.model_dump(include={"rank_fraction", "eps", "max_size"})

    def model_for(pooling: str) -> Any:
        if "model" not in memo:
            bench.log("factoring the experts for MASS")
            parts = mass_parts(bench)
            adapter = Seq2SeqAdapter().bind(bench.model)
            memo["model"] = parts.model(bench.model, settings=mass_settings(bench, parts.serve, "mean"),
                                        pool=adapter.pool, features=adapter.features,
                                        blocks=adapter.block_names(bench.model))
        return memo["model"].with_settings(pooling=pooling)

    rows = {}
    for row, pooling in MASS_ROWS.items():
        out = {}
        for task, name in enumerate(bench.names):
            bench.log(f"{row} on {name}")
            split = bench.splits[task]
            options = {**mass_opts, **{k: v for k, v in bench.config.mass.model_dump().items()
                                       if v is not None and k in ServeSettings.model_fields}, "pooling": pooling,
                       "routing_layer": bench.config.routing_layer}

            def run(task: int = task, split: GlueSplit = split, row: str = row, name: str = name,
                    pooling: str = pooling) -> dict[str, Any]:
                routed = model_for(pooling)
                texts = generate_texts(bench.model, bench.tokenizer, split.prompts,
                                       batch_size=bench.config.eval.batch_size, label=f"{row} {name}", routed=routed)
                return score_task(split.task, texts, bench.targets[task]).as_dict()

            out[name] = cache.get_or_run("generate-mass", run, GenerationScoreKey(task=name, protocol=PROTOCOL,
                                                                                   options=options),
                                         revision=MASS_REVISION)
        rows[row] = summarize(out, expert, options={"pooling": pooling})
    return rows


# ----- the SMILE row -----------------------------------------------------------------------------------------

class LoraDeltas(Mapping[str, torch.Tensor]):
    """A LoRA expert's task vector over the keys it changes only, each dense ``scale B A`` made when read (a
    dense vector over the whole model, LoRA's ``task_vector``, would hold T copies of every untouched matrix)."""

    def __init__(self, expert: LoraExpert) -> None:
        self._expert = expert
        self._keys = [*expert.pairs, *(k for k in expert.non_matrix if k not in expert.pairs)]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._expert.pairs:
            return self._expert.dense(key)
        if key in self._expert.non_matrix:
            return self._expert.non_matrix[key].float()
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def smile_vector(bench: GenerationBench, task: int) -> Mapping[str, torch.Tensor]:
    """What SMILE reads of expert ``task``: a full fine-tune's streamed task vector, a LoRA adapter's deltas."""
    return LoraDeltas(bench.lora[task]) if bench.lora is not None else expert_vector(bench, task)


def smile_rows(bench: GenerationBench, cache: EvalCache, expert: Mapping[str, Mapping[str, Any]]
               ) -> dict[str, dict[str, Any]]:
    """The SMILE-2 row: each task cached; the upscaled copy of the base is built only when a score is missing,
    and dropped after the row."""
    from massmerge.smile import SmileSettings, build_smile

    settings = SmileSettings()
    options = {**settings.model_dump(), "experts": "lora" if bench.lora is not None else "full"}
    row = f"SMILE-{settings.top_k}"
    memo: dict[str, nn.Module] = {}

    def model() -> nn.Module:
        if "model" not in memo:
            bench.log(f"building {row} (SMILE upscaling of every changed Linear)")
            memo["model"] = build_smile(bench.model, [smile_vector(bench, t) for t in range(len(bench.names))],
                                        settings)
        return memo["model"]

    out = {}
    for task, name in enumerate(bench.names):
        bench.log(f"{row} on {name}")

        def run(task: int = task, name: str = name) -> dict[str, Any]:
            split = bench.splits[task]
            texts = generate_texts(model(), bench.tokenizer, split.prompts, batch_size=bench.config.eval.batch_size,
                                   label=f"{row} {name}")
            return score_task(split.task, texts, bench.targets[task]).as_dict()

        out[name] = cache.get_or_run("generate-smile", run, GenerationScoreKey(task=name, protocol=PROTOCOL,
                                                                                options=options))
    memo.clear()
    return {row: summarize(out, expert, options=options)}


# ----- the report -------------------------------------------------------------------------------------------

def _pct(value: float | None) -> str:
    return "undefined" if value is None else f"{100 * value:.1f}"


def markdown(report: Mapping[str, Any]) -> str:
    """report.md: one table of scores (x100), averages and normalized averages, then the notes."""
    names = [t["name"] for t in report["tasks"]]
    lines = ["# Flan-T5 GLUE generation (FusionBench's protocol)", "",
             (f"Greedy generate(max_length={MAX_LENGTH}), prompts padded to {MAX_INPUT_LENGTH}; exact match, "
              "STS-B: Spearman over the split. Scores x100."), "",
             "| row | " + " | ".join(names) + " | avg | normalized |",
             "|---|" + "---|" * (len(names) + 2)]
    for row, data in report["methods"].items():
        cells = [_pct(data["scores"][n]) for n in names]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {_pct(data['avg'])} | {_pct(data['avg_normalized'])} |")
    notes = [f"- {row}, {task}: {note}" for row, data in report["methods"].items()
             for task, note in data["notes"].items()]
    if notes:
        lines += ["", "Undefined scores (the averages leave them out only in avg_defined of report.json):", *notes]
    if report.get("reference"):
        lines += ["", "Reference figures (published, not measured here): " +
                  "; ".join(f"{r['row']} {r['value']}" + (f" ({r['normalized']}% normalized)" if r.get("normalized")
                                                           else "") for r in report["reference"])]
    if report["not_yet_runnable"]:
        lines += ["", "Not yet runnable: " + "; ".join(f"{m}: {why}" for m, why in report["not_yet_runnable"].items())]
    return "\n".join(lines) + "\n"


def write_generation_report(report: Mapping[str, Any], out_dir: Path, *, show: bool = True) -> dict[str, Any]:
    """report.json (no NaN: an undefined score is null with its note) and report.md, each written atomically."""
    import json

    try:
        text = json.dumps(report, indent=2, allow_nan=False)
    except ValueError as exc:
        raise MassMergeError(f"{out_dir}/report.json: a score is not a finite number ({exc})") from None
    write_text_atomically(Path(out_dir) / "report.json", text)
    md = markdown(report)
    write_text_atomically(Path(out_dir) / "report.md", md)
    if show:
        print(md)
    return dict(report)


def evaluate_generation(config: Any, *, cache: EvalCache, log: Log = print, show: bool = True) -> dict[str, Any]:
    """Run the rows and write the report to the config's output folder."""
    return write_generation_report(run_generation_benchmark(config, cache=cache, log=log), Path(config.output),
                                   show=show)


__all__ = [
    "GENERATION_METHODS",
    "MASS_ROWS",
    "NOT_YET",
    "GenerationBench",
    "decoded_targets",
    "encode",
    "evaluate_generation",
    "generate_texts",
    "markdown",
    "mass_factors",
    "mass_parts",
    "mass_rows",
    "mass_settings",
    "methods_of",
    "prepare",
    "run_generation_benchmark",
    "smile_rows",
    "summarize",
    "write_generation_report",
]
