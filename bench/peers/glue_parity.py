"""massmerge's Flan-T5 GLUE scoring against FusionBench's own task-pool code, per task, on a tiny T5.

What it checks: a tiny random Flan-T5-shaped model (gated-gelu, untied LM head, width 16, 2 + 2 blocks) with a
T5 tokenizer.json built offline by ``tokenizers``, fine-tuned a little on half of a small GLUE-format dataset
(nyu-mll/glue's parquet layout, cola / rte / mnli / stsb, written by this script), so that its answers are partly
right and its STS-B outputs are numbers. A child process in FusionBench's venv scores it with FusionBench's code:
``glue_processors[task](template=glue_prompt_templates[task], tokenizer, tokenizer_kwargs={padding: max_length,
truncation, return_tensors: pt})`` mapped over the parquet split (``datasets``), a ``DataLoader`` with
``default_data_collator``, then ``evaluate_accuracy`` / ``evaluate_spearman_rho`` from
``fusion_bench.tasks.flan_t5_text_generation.glue_evaluation``, the functions its
``FlanT5GLUETextGenerationTaskPool`` calls (only ``load_dataset("glue")`` and Lightning Fabric are left out:
they need the network and a device wrapper). This script scores the same files with massmerge
(``read_glue_split``, ``generate_texts``, ``score_task``). Per-task scores must be identical (exit status 1
otherwise); an undefined Spearman is NaN there and None here, and counts as equal.

The attention mask: FusionBench calls ``generate(input_ids, max_length=10)`` without one. transformers 4.x inferred
it from the pad id; 5.x does not for encoder-decoders (see massmerge.data.glue). With the peer's transformers >= 5
the child adds the mask 4.x would have inferred (``--peer-mask auto``, said in the output); ``--peer-mask none``
runs FusionBench's call as is, to show the difference.

Optional, by hand, never in CI. Set-up: ``bash bench/peers/setup.sh fusion-bench``. Run (massmerge's python):
``python bench/peers/glue_parity.py [--rows 8] [--steps 300] [--peer-mask auto|none]`` (training stops once the
trained half is learned).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from massmerge.data.glue import COLUMNS, EVAL_SPLITS, LABEL_WORDS, read_glue_split
from massmerge.experiments.generation_eval import decoded_targets, generate_texts
from massmerge.experiments.glue_metrics import score_task

HERE = Path(__file__).resolve().parent
PEER_PYTHON = HERE / ".venvs" / "fusion-bench" / "bin" / "python"
TASKS = ("cola", "rte", "mnli", "stsb")
WORDS = ["yes", "no", "acceptable", "unacceptable", "entailment", "neutral", "contradiction", "the", "a", "is",
         "cat", "dog", "sat", "ran", "on", "mat", "park", "not", "and", "same"]
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;'\"?!()-")

CHILD = r'''
import json, math, sys
import torch
import transformers
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, T5ForConditionalGeneration, default_data_collator
from fusion_bench.tasks.flan_t5_text_generation.glue_evaluation import evaluate_accuracy, evaluate_spearman_rho
from fusion_bench.tasks.flan_t5_text_generation.glue_preprocessors import glue_processors
from fusion_bench.tasks.flan_t5_text_generation.glue_prompt_templates import glue_prompt_templates

job = json.loads(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
model = T5ForConditionalGeneration.from_pretrained(job["model"]).eval()
major = int(transformers.__version__.split(".")[0])
infer = job["peer_mask"] == "auto" and major >= 5
if infer:  # what transformers 4.x's generate did when no attention_mask was given
    plain = model.generate
    def generate(input_ids, **kwargs):
        kwargs.setdefault("attention_mask", input_ids.ne(tokenizer.pad_token_id).long())
        return plain(input_ids, **kwargs)
    model.generate = generate
scores = {}
for task, file in job["files"].items():
    data = Dataset.from_parquet(file)
    pre = glue_processors[task](template=glue_prompt_templates[task], tokenizer=tokenizer,
                                tokenizer_kwargs={"padding": "max_length", "truncation": True, "return_tensors": "pt"})
    data = data.map(pre, batched=True, remove_columns=data.column_names, num_proc=1)
    loader = DataLoader(data, batch_size=job["batch_size"], shuffle=False, collate_fn=default_data_collator)
    fn = evaluate_spearman_rho if task == "stsb" else evaluate_accuracy
    value = float(fn(model, loader, tokenizer))
    scores[task] = None if math.isnan(value) else value
print(json.dumps({"scores": scores, "transformers": transformers.__version__, "inferred_mask": infer}))
'''


def build_tokenizer(out: Path) -> int:
    """A T5TokenizerFast-compatible tokenizer.json (Unigram, Metaspace, ``$A </s>``), as tests/glue_fixtures.py."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    extra = [f"<extra_id_{i}>" for i in range(99, -1, -1)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    pieces += [(c, -5.0) for c in CHARS] + [("\u2581" + c, -5.5) for c in CHARS] + [(e, 0.0) for e in extra]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    data = json.loads(tok.to_str())
    data["added_tokens"] = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True}
                            for i, c in [(0, "<pad>"), (1, "</s>"), (2, "<unk>")]
                            + [(len(pieces) - 100 + j, e) for j, e in enumerate(extra)]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 100, "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": extra}))
    return len(pieces)


def write_glue(root: Path, rows: int, seed: int) -> dict[str, Path]:
    """Each task's eval split in nyu-mll/glue's layout and column types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    files = {}
    for task in TASKS:
        cols = {c: [" ".join(rng.choice(WORDS[7:]) for _ in range(rng.randint(3, 7))) for _ in range(rows)]
                for c in COLUMNS[task]}
        labels = ([round(rng.uniform(0, 5), 3) for _ in range(rows)] if task == "stsb"
                  else [rng.randrange(len(LABEL_WORDS[task])) for _ in range(rows)])
        table = {c: pa.array(v, type=pa.string()) for c, v in cols.items()}
        table["label"] = pa.array(labels, type=pa.float32() if task == "stsb" else pa.int64())
        table["idx"] = pa.array(list(range(rows)), type=pa.int32())
        (root / task).mkdir(parents=True, exist_ok=True)
        files[task] = root / task / f"{EVAL_SPLITS[task]}-00000-of-00001.parquet"
        pq.write_table(pa.table(table), files[task])
    return files


def build_model(out: Path, glue: Path, steps: int, seed: int) -> None:
    """The tiny expert: random Flan-T5 shape, Adam on the first half of every task's rows until it has learned
    them (or ``steps``); the other half it answers as it can, so the scores are neither 0 nor 1."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    vocab = build_tokenizer(out)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=((vocab + 7) // 8) * 8, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                      num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                      relative_attention_max_distance=16, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    config.tie_word_embeddings = False
    config.scale_decoder_outputs = False
    model = T5ForConditionalGeneration(config)
    model.encoder.embed_tokens.weight = model.shared.weight  # tied as from_pretrained ties a loaded T5
    model.decoder.embed_tokens.weight = model.shared.weight
    tok = AutoTokenizer.from_pretrained(out)
    prompts, targets = [], []
    for task in TASKS:
        data = read_glue_split(glue, task)
        half = len(data) // 2
        prompts += data.prompts[:half]
        targets += data.targets[:half]
    inputs = tok(prompts, padding=True, return_tensors="pt")
    labels = tok(targets, padding=True, return_tensors="pt")["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(steps):
        result = model(**inputs, labels=labels)
        known = labels != -100
        if bool((result.logits.argmax(-1)[known] == labels[known]).all()):
            break  # the trained half is learned: greedy decoding reproduces it
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
    model.eval().save_pretrained(out)


def ours(model_dir: Path, glue: Path, batch_size: int) -> dict[str, float | None]:
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = T5ForConditionalGeneration.from_pretrained(model_dir).eval()
    out = {}
    for task in TASKS:
        data = read_glue_split(glue, task)
        outputs = generate_texts(model, tok, data.prompts, batch_size=batch_size)
        out[task] = score_task(task, outputs, decoded_targets(tok, data.targets)).value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer-mask", choices=("auto", "none"), default="auto")
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    args = parser.parse_args()
    if not args.peer_python.is_file():
        raise SystemExit(f"no FusionBench venv at {args.peer_python}: run `bash bench/peers/setup.sh fusion-bench`")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_glue(root / "glue", args.rows, args.seed)
        build_model(root / "model", root / "glue", args.steps, args.seed)
        mine = ours(root / "model", root / "glue", args.batch_size)
        job = {"model": str(root / "model"), "tokenizer": str(root / "model"), "batch_size": args.batch_size,
               "files": {t: str(f) for t, f in files.items()}, "peer_mask": args.peer_mask}
        script = root / "child.py"
        script.write_text(CHILD, encoding="utf-8")
        proc = subprocess.run([str(args.peer_python), str(script), json.dumps(job)], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise SystemExit(f"FusionBench's child failed:\n{proc.stderr[-3000:]}")
        peer = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"FusionBench side: transformers {peer['transformers']}, mask "
          f"{'inferred as 4.x did' if peer['inferred_mask'] else 'as FusionBench passes it (none)'}")
    bad = 0
    for task in TASKS:
        a, b = mine[task], peer["scores"][task]
        same = a == b or (a is None and b is None)
        bad += not same
        show = {k: "undefined" if v is None else f"{v:.6f}" for k, v in (("ours", a), ("fusion_bench", b))}
        print(f"{task:5s} ours {show['ours']:>10s}  fusion_bench {show['fusion_bench']:>10s}  "
              f"{'identical' if same else 'DIFFERENT'}")
    if any(v is not None and not math.isfinite(v) for v in mine.values()):
        bad += 1
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
