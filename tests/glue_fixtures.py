"""An offline miniature of the Flan-T5 GLUE benchmark: google/flan-t5-base, FusionBench's experts, nyu-mll/glue.

What the real repos hold (checked on the hub's file lists):
- google/flan-t5-base: config.json, generation_config.json, model.safetensors, special_tokens_map.json,
  spiece.model, tokenizer.json, tokenizer_config.json (T5Tokenizer, model_max_length 512, 100 extra ids).
  Here the tokenizer.json is a Unigram model built with ``tokenizers`` (Metaspace pre-tokenizer, ``$A </s>``
  post-processor, <pad>=0 </s>=1 <unk>=2) and no spiece.model: T5TokenizerFast reads tokenizer.json alone.
- tanganke/flan-t5-base_glue-<task>: config.json + float32 model.safetensors, no tokenizer, no generation config.
- tanganke/flan-t5-base_glue-<task>_lora-16: adapter_config.json (r 16, lora_alpha 32, target q and v,
  SEQ_2_SEQ_LM, base google/flan-t5-base) + adapter_model.safetensors with PEFT's key names
  (``base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight``).
- nyu-mll/glue: ``{task}/{split}-00000-of-00001.parquet``; here train and test files are garbage bytes, so a run
  that opened them would fail.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from hub_fixtures import cache_repo

from massmerge.data.glue import COLUMNS, EVAL_SPLITS, GLUE_TASKS, LABEL_WORDS

BASE_ID = "google/flan-t5-base"
GLUE_ID = "nyu-mll/glue"
LORA_RANK = 4  # the real adapters use 16; the tiny model is 16 wide
WORDS = ["yes", "no", "acceptable", "unacceptable", "positive", "negative", "entailment", "neutral",
         "contradiction", "the", "a", "is", "sentence", "question", "text", "Answer", "Answere", "with", "or",
         "Does", "Given", "Are", "Do", "Consider", "Indicate", "if", "following", "and", "same", "meaning"]
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;'\"?!()-")
SENTENCES = ["the cat sat on the mat", "a dog is running", "is this the same question", "the text says no",
             "yes it is positive", "negative and neutral", "Do it or not", "the sentence is acceptable"]


def tokenizer_files(out: Path) -> int:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json in T5's layout; returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    extra = [f"<extra_id_{i}>" for i in range(99, -1, -1)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    pieces += [(c, -5.0) for c in CHARS] + [("\u2581" + c, -5.5) for c in CHARS]
    pieces += [(e, 0.0) for e in extra]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    specials = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for i, c in enumerate(["<pad>", "</s>", "<unk>"])]
    specials += [{"id": len(pieces) - 100 + j, "content": e, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for j, e in enumerate(extra)]
    data = json.loads(tok.to_str())
    data["added_tokens"] = specials
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 100, "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": extra}))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": extra}))
    return len(pieces)


def t5_config(vocab_size: int, **changes):
    """Flan-T5-base's config in miniature (gated-gelu, untied LM head), 2 + 2 blocks, width 16."""
    from transformers import T5Config

    options = {"vocab_size": vocab_size, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 2,
               "num_decoder_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8,
               "relative_attention_max_distance": 16, "feed_forward_proj": "gated-gelu", "decoder_start_token_id": 0,
               "pad_token_id": 0, "eos_token_id": 1, "dropout_rate": 0.0}
    options.update(changes)
    config = T5Config(**options)
    # transformers 5's T5Config forces the tie on in its constructor (and reads the saved `false` of T5 v1.1 /
    # Flan-T5 as "do not scale the decoder output"); set both as loading flan-t5-base's config.json leaves them
    config.tie_word_embeddings = False
    config.scale_decoder_outputs = False
    return config


def retie(model) -> None:
    """Give T5's embedding aliases the shared embedding's values, as every real T5 checkpoint holds them."""
    with torch.no_grad():
        model.encoder.embed_tokens.weight.copy_(model.shared.weight)
        model.decoder.embed_tokens.weight.copy_(model.shared.weight)


def save_base(out: Path, seed: int = 0) -> Path:
    """google/flan-t5-base in miniature: tiny random weights, the tokenizer and config files."""
    from transformers import T5ForConditionalGeneration

    vocab = tokenizer_files(out)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(t5_config(((vocab + 7) // 8) * 8))
    retie(model)
    model.save_pretrained(out)
    return out


def save_full_expert(base: Path, out: Path, seed: int, scale: float = 0.2, **config_changes) -> Path:
    """A full fine-tune in FusionBench's layout: config.json + float32 model.safetensors, nothing else."""
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(base)
    model.config.tie_word_embeddings = False  # as FusionBench's experts (transformers 4) saved it
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale * param.abs().mean().clamp(min=1e-3))
    retie(model)
    if config_changes:
        for key, value in config_changes.items():
            setattr(model.config, key, value)
    model.save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)
    return out


def train_expert(base: Path, glue: Path, task: str, out: Path, *, steps: int = 150, seed: int = 0) -> Path:
    """A full fine-tune that has learned its task's (tiny) eval split, so its exact-match score is 1 and the
    other rows are told apart: Adam on the unpadded prompts until every target token is the argmax."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from massmerge.data.glue import read_glue_split

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = T5ForConditionalGeneration.from_pretrained(base)
    data = read_glue_split(glue, task)
    inputs = tok(data.prompts, padding=True, return_tensors="pt")
    labels = tok(data.targets, padding=True, return_tensors="pt")["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    model.train()
    for _ in range(steps):
        result = model(**inputs, labels=labels)
        known = labels != -100
        if bool((result.logits.argmax(-1)[known] == labels[known]).all()):
            break  # teacher-forced argmax right everywhere: greedy decoding reproduces every target
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
    retie(model)
    model.config.tie_word_embeddings = False
    model.eval().save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)
    return out


def save_lora_expert(base: Path, out: Path, seed: int, *, base_id: str = BASE_ID,
                     targets: tuple[str, ...] = ("q", "v")) -> Path:
    """A PEFT LoRA adapter of the tiny base as FusionBench's ``_lora-16`` repos hold it (r scaled down)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(base)
    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(targets),
                        task_type=TaskType.SEQ_2_SEQ_LM, lora_dropout=0.1)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(str(out))
    raw = json.loads((out / "adapter_config.json").read_text())
    raw["base_model_name_or_path"] = base_id
    (out / "adapter_config.json").write_text(json.dumps(raw))
    (out / "README.md").unlink(missing_ok=True)
    return out


def _row(task: str, rng: random.Random) -> dict:
    row: dict = {c: " ".join(rng.sample(SENTENCES[0].split() + SENTENCES[rng.randrange(8)].split(), 4))
                 for c in COLUMNS[task]}
    row["label"] = round(rng.uniform(0, 5), 3) if task == "stsb" else rng.randrange(len(LABEL_WORDS[task]))
    row["idx"] = rng.randrange(10**6)
    return row


def save_glue(out: Path, rows: int = 6, seed: int = 0, tasks: tuple[str, ...] = GLUE_TASKS) -> Path:
    """nyu-mll/glue's layout: each task's eval split as parquet (GLUE's column types), garbage train/test beside."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    for task in tasks:
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        data = [_row(task, rng) for _ in range(rows)]
        types = {c: pa.string() for c in COLUMNS[task]}
        types.update(label=pa.float32() if task == "stsb" else pa.int64(), idx=pa.int32())
        table = pa.table({k: pa.array([r[k] for r in data], type=t) for k, t in types.items()})
        pq.write_table(table, folder / f"{EVAL_SPLITS[task]}-00000-of-00001.parquet")
        for split in ("train", "test", "validation_mismatched" if task == "mnli" else "test_x"):
            (folder / f"{split}-00000-of-00001.parquet").write_bytes(b"not parquet: must never be read")
    return out


def build_hub(tmp: Path, tasks: tuple[str, ...] = ("cola", "rte", "stsb"), *, lora: bool = True,
              rows: int = 4, trained: tuple[str, ...] = ("cola",)) -> Path:
    """An HF_HOME whose hub cache holds the base, the full and LoRA experts of ``tasks`` and nyu-mll/glue; the
    ``trained`` experts have learned their split, the others are random perturbations of the base."""
    hf_home = tmp / "hf"
    base = save_base(tmp / "src" / "base")
    cache_repo(hf_home, BASE_ID, base)
    glue = save_glue(tmp / "src" / "glue", rows=rows, tasks=tasks)
    for i, task in enumerate(tasks):
        folder = tmp / "src" / task
        expert = train_expert(base, glue, task, folder) if task in trained else save_full_expert(base, folder, 10 + i)
        cache_repo(hf_home, f"tanganke/flan-t5-base_glue-{task}", expert)
        if lora:
            cache_repo(hf_home, f"tanganke/flan-t5-base_glue-{task}_lora-16",
                       save_lora_expert(base, tmp / "src" / f"{task}_lora", 20 + i))
    cache_repo(hf_home, GLUE_ID, glue, repo_type="dataset")
    return hf_home


def glue_config(tasks: tuple[str, ...], *, lora: bool = False, output: Path, **extra) -> dict:
    """The tiny counterpart of examples/flan_t5_base_glue8*.yaml."""
    suffix = "_lora-16" if lora else ""
    return {"family": "seq2seq", "base": BASE_ID, "tokenizer": BASE_ID,
            "tasks": [{"name": t, "expert": f"tanganke/flan-t5-base_glue-{t}{suffix}", "dataset": GLUE_ID}
                      for t in tasks],
            "methods": ["zeroshot", "experts", "task_arithmetic", "ties", "tsv_m"],
            "method_options": {"task_arithmetic": {"alpha": 0.3}},
            "eval": {"batch_size": 4, "device": "cpu"}, "output": str(output), **extra}


def widen(model: torch.nn.Module) -> torch.nn.Module:
    """T5's own init generates one token everywhere: wider matrices give varied tokens (as in test_seam)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "relative_attention_bias" not in name:
                param.copy_(0.6 * torch.randn(param.shape, generator=gen))
        model.encoder.embed_tokens.weight.copy_(model.shared.weight)
        model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    return model


def widened_base(root: Path, *, max_length: int | None = None) -> Path:
    """``root/base``: the tiny Flan-T5 replica with wider weights (:func:`widen`) and an untied LM head, its
    tokenizer files copied; ``max_length`` lowers the tokenizer's ``model_max_length`` (to test cut prompts)."""
    import shutil

    import transformers

    save_base(root / "raw")
    model = widen(transformers.T5ForConditionalGeneration.from_pretrained(root / "raw"))
    model.config.tie_word_embeddings = False
    model.save_pretrained(root / "base")
    for file in (root / "raw").iterdir():
        if file.name.startswith(("tokenizer", "special")):
            shutil.copyfile(file, root / "base" / file.name)
    config = json.loads((root / "base" / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (root / "base" / "config.json").write_text(json.dumps(config))
    if max_length is not None:
        tok = json.loads((root / "base" / "tokenizer_config.json").read_text())
        tok["model_max_length"] = max_length
        (root / "base" / "tokenizer_config.json").write_text(json.dumps(tok))
    return root / "base"
