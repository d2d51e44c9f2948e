"""Throughput of the served path, ``massmerge predict``, against a plain HF forward + mean pool of the same texts.

What it measures (issue 13), on real texts of the suite's tasks shuffled so batches mix task sets:

- steady state, in one process: the Predictor (what the CLI runs) on a loaded artifact after a
  warm-up batch, against the base model's forward + mean pool of the same texts, tokenized once as predict
  tokenizes them and batched as predict batches its first pass (:func:`base_batches`); rounds interleaved, each
  timed on fresh merged-set caches (a new ``load``) and repeated, medians reported;
- end to end, whole processes: ``massmerge predict ARTIFACT inputs.jsonl`` against a process that loads the
  base, tokenizes, runs forward + pool and writes JSON lines; interleaved, repeated;
- the shares of one predict run: first pass (to the routing layers) + router, set merges (new task sets'
  cores and values), second pass + heads, from the engine's own stage clock (``MASSModel.timed``).

Wall and CPU seconds are both printed (the machine may be shared: compare the ratios of one run).

The artifact: ``--artifact DIR`` (e.g. from ``massmerge suite --preset distinct --export-artifact DIR``, real
experts, so the routing and the task-set mix are real); without it, one is built from 8 seeded low-rank
experts of the real base and the suite's zero-shot heads (routing is then not meaningful, only its cost).

    python bench/predict_throughput.py --artifact massmerge-suite/artifact [--inputs 1024] [--rounds 3]
        [--restart-block 4] [--device cuda] [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import table, timed_process, write_json  # noqa: E402

BASE_SCRIPT = """
import json, sys, torch
from transformers import AutoModel, AutoTokenizer
from massmerge.mass.pooling import masked_mean
bench_dir, model_dir, inputs, output, batch, length, tasks, device, dtype = sys.argv[1:10]
sys.path.insert(0, bench_dir)
from predict_throughput import base_batches
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModel.from_pretrained(model_dir).eval().to(device=device, dtype=getattr(torch, dtype))
texts = [json.loads(line)["text"] for line in open(inputs, encoding="utf-8")]
with torch.inference_mode(), open(output, "w") as out:
    for enc in base_batches(texts, tok, int(batch), int(length), int(tasks)):
        enc = {k: v.to(device) for k, v in enc.items()}
        feats = masked_mean(model(**enc).last_hidden_state, enc["attention_mask"])
        for row in feats.argmax(-1).tolist():
            out.write(json.dumps({"feature_argmax": row}) + "\\n")
"""


def base_batches(texts: list[str], tokenizer, batch: int, length: int, tasks: int) -> Iterator[dict]:  # noqa: ANN001
    """The base's inputs tokenized as ``predict`` tokenizes them (once, truncated, then padded per batch) and
    batched as ``predict`` batches its first pass for ``tasks`` tasks (length-sorted within windows,
    :func:`massmerge.mass.serving.first_pass_batches`): the same tokenization work and the same padding on both
    sides, so the base is fair (not input-order, not tokenized twice)."""
    from massmerge.mass.serving import first_pass_batches

    encoded = tokenizer(texts, truncation=True, max_length=length)
    rows = [{key: encoded[key][i] for key in encoded} for i in range(len(texts))]
    for index in first_pass_batches([len(row["input_ids"]) for row in rows], batch, tasks):
        yield dict(tokenizer.pad([rows[i] for i in index], return_tensors="pt"))


def served_lengths(artifact: Path, batch: int | None, length: int | None) -> tuple[int, int]:
    """The batch size and max length ``massmerge predict`` serves the artifact with (its manifest's serve
    settings, the model's positions for a missing length), unless given."""
    from massmerge.adapters.text import FALLBACK_MAX_LENGTH
    from massmerge.artifact import read_manifest

    serve = read_manifest(artifact).serve
    return batch or serve.batch_size, length or serve.max_length or FALLBACK_MAX_LENGTH


def task_count(artifact: Path) -> int:
    from massmerge.artifact import read_manifest

    return len(read_manifest(artifact).task_names)


def suite_texts(count: int, seed: int) -> list[str]:
    """Real texts from the distinct preset's test splits, shuffled so that batches mix tasks."""
    from massmerge.data.tasks import get_preset, load_task

    preset = get_preset("distinct")
    texts: list[str] = []
    for name in preset.tasks:
        texts += load_task(name, preset.n_train, preset.n_val, preset.n_test).test.texts
    random.Random(seed).shuffle(texts)
    return (texts * (count // max(len(texts), 1) + 1))[:count]


def synthetic_artifact(directory: Path, tasks: int = 8) -> Path:
    """An artifact from seeded low-rank experts of the real MiniLM and the distinct preset's heads."""
    from massmerge.adapters import get_adapter
    from massmerge.artifact import save_artifact
    from massmerge.data.tasks import get_preset, load_task
    from massmerge.experiments.finetune import load_backbone
    from massmerge.experiments.suite import make_heads
    from massmerge.mass import ExpertFactors, MASSModel, make_serve_settings
    from massmerge.mass.storage import round_factors, storage_dtype

    backbone = load_backbone()
    model = backbone.model
    gen = torch.Generator().manual_seed(0)
    vectors = []
    for _ in range(tasks):
        tv = {}
        for key, value in model.state_dict().items():
            if not value.is_floating_point():
                continue
            if value.ndim == 2:
                m, n = value.shape
                tv[key] = 0.02 * torch.randn(m, 16, generator=gen) @ torch.randn(16, n, generator=gen) / 4
            else:
                tv[key] = 0.002 * torch.randn(value.shape, generator=gen)
        vectors.append(tv)
    preset = get_preset("distinct")
    task_data = [load_task(name, 10, 10, 10) for name in preset.tasks[:tasks]]
    heads = make_heads(backbone, task_data, 20.0)
    factors = round_factors(ExpertFactors.build(iter(vectors), [t.name for t in task_data]), storage_dtype(torch.float32))
    adapter = get_adapter("text", special_ids=backbone.tokenizer.all_special_ids).bind(model)
    settings = make_serve_settings(routing_layers=(adapter.routing_layer(model),), max_length=48)
    mass = MASSModel(model, factors, heads, settings, pool=adapter.pool, features=adapter.features)
    return save_artifact(mass, directory, adapter=adapter, tokenizer_dir=backbone.path,
                         class_names=[t.classes for t in task_data])


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn) -> tuple[float, float]:  # noqa: ANN001
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def steady_state(artifact: Path, texts: list[str], batch: int, length: int, rounds: int, restarts: list[int],
                 device: str, dtype: str) -> dict:
    """Interleaved rounds of the Predictor's rows (what predict runs; fresh caches: a new load each round), one per restart block, and the
    base's forward + pool, all on ``device``."""
    from massmerge.artifact import MODEL_DIR
    from massmerge.artifact.predictor import Predictor, predict_file_rows
    from massmerge.device import sync, to_device
    from massmerge.mass.pooling import masked_mean
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(artifact / MODEL_DIR))
    target = torch.device(device)
    base = AutoModel.from_pretrained(str(artifact / MODEL_DIR)).eval().to(device=target, dtype=getattr(torch, dtype))
    numbered = list(enumerate(texts, start=1))
    tasks = task_count(artifact)

    def plain() -> None:
        with torch.inference_mode():
            for enc in base_batches(texts, tokenizer, batch, length, tasks):
                enc = to_device(enc, target)
                masked_mean(base(**enc).last_hidden_state, enc["attention_mask"])
        sync(target)

    samples: dict[str, list[tuple[float, float]]] = {"base": [], **{point_name(j): [] for j in restarts}}
    shares: dict[str, list[dict[str, float]]] = {point_name(j): [] for j in restarts}
    for _ in range(rounds):
        samples["base"].append(timed(plain))
        for j in restarts:
            predictor = Predictor(artifact, device=target, restart_block=j, dtype=dtype, batch_size=batch,
                                  max_length=length)
            list(predict_file_rows(predictor, numbered[:batch]))  # warm-up
            with predictor.model.timed() as seconds:
                samples[point_name(j)].append(timed(lambda p=predictor: list(predict_file_rows(p, numbered))))
            shares[point_name(j)].append(dict(seconds))
    return {"samples": samples, "shares": shares}


def point_name(restart: int) -> str:
    return "mass" if restart == 0 else f"mass, restart block {restart}"


def end_to_end(artifact: Path, texts: list[str], batch: int, length: int, rounds: int, tmp: Path,
               restarts: list[int], device: str, dtype: str) -> dict:
    inputs = tmp / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    script = tmp / "plain_forward.py"
    script.write_text(BASE_SCRIPT)
    commands = {point_name(j): [sys.executable, "-m", "massmerge", "predict", str(artifact), str(inputs), "--output",
                                str(tmp / "mass.jsonl"), "--batch-size", str(batch), "--max-length", str(length),
                                "--restart-block", str(j), "--device", device, "--dtype", dtype] for j in restarts}
    plain = [sys.executable, str(script), str(Path(__file__).resolve().parent), str(artifact / "model"), str(inputs),
             str(tmp / "base.jsonl"), str(batch), str(length), str(task_count(artifact)), device, dtype]
    samples: dict[str, list[tuple[float, float]]] = {"base": [], **{name: [] for name in commands}}
    for _ in range(rounds):
        samples["base"].append(timed_process(plain))
        for name, command in commands.items():
            samples[name].append(timed_process(command))
    return {"samples": samples}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def summary(name: str, samples: dict[str, list[tuple[float, float]]], point: str, count: int) -> dict:
    base_wall, mass_wall = median([w for w, _ in samples["base"]]), median([w for w, _ in samples[point]])
    base_cpu, mass_cpu = median([c for _, c in samples["base"]]), median([c for _, c in samples[point]])
    return {"measure": f"{name}: {point}", "inputs": count, "base_wall_s": base_wall, "mass_wall_s": mass_wall,
            "base_cpu_s": base_cpu, "mass_cpu_s": mass_cpu, "ratio_wall": base_wall / mass_wall,
            "ratio_cpu": base_cpu / mass_cpu, "mass_inputs_per_s": count / mass_wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, default=None, help="artifact to serve [default: a synthetic one]")
    parser.add_argument("--inputs", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=None, help="[default: the artifact's serve.batch_size]")
    parser.add_argument("--max-length", type=int, default=None, help="[default: the artifact's serve.max_length]")
    parser.add_argument("--restart-block", type=int, default=None, help="also measure this restart block beside 0")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (the base runs there too)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="serving precision of MASS and of the plain base")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    texts = suite_texts(args.inputs, args.seed)
    restarts = [0] + ([args.restart_block] if args.restart_block else [])
    with tempfile.TemporaryDirectory(prefix="massmerge-predict-") as tmp_name:
        tmp = Path(tmp_name)
        artifact = args.artifact or synthetic_artifact(tmp / "artifact")
        args.batch_size, args.max_length = served_lengths(artifact, args.batch_size, args.max_length)
        steady = steady_state(artifact, texts, args.batch_size, args.max_length, args.rounds, restarts, args.device,
                              args.dtype)
        whole = end_to_end(artifact, texts, args.batch_size, args.max_length, args.rounds, tmp, restarts, args.device,
                           args.dtype)
    rows = [summary("steady state (Predictor)", steady["samples"], point_name(j), len(texts)) for j in restarts]
    rows += [summary("end to end (massmerge predict)", whole["samples"], point_name(j), len(texts)) for j in restarts]
    print(table(rows, list(rows[0])))
    for point, per_round in steady["shares"].items():
        shares = {key: median([s[key] for s in per_round]) for key in per_round[0]}
        total = sum(shares.values()) or 1.0
        print(f"\nshares of one steady-state predict run, {point} (median over rounds): " +
              ", ".join(f"{key} {value:.2f} s ({100 * value / total:.0f}%)" for key, value in shares.items()))
    source = str(args.artifact) if args.artifact else "synthetic (seeded low-rank experts of the real base)"
    print(f"\nartifact: {source}; {args.inputs} real suite texts, batch {args.batch_size}, max length "
          f"{args.max_length}, device {args.device}, {torch.get_num_threads()} torch threads")
    path = write_json("predict_throughput", {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                             "shares": steady["shares"], "samples": {"steady": steady["samples"],
                                                                                     "end_to_end": whole["samples"]}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
