"""GLUE as text-to-text prompts, by FusionBench's Flan-T5 protocol, read from the hub's parquet layout.

Why FusionBench's protocol verbatim: the paper's Flan-T5 row (and the anchors' figures it is normalized against)
was scored with it, so a prompt that differs by one character is a different benchmark. The templates below are
tanganke/fusion_bench ``fusion_bench/tasks/flan_t5_text_generation/glue_prompt_templates.py`` as they are, typos
("Answere") kept; the label words are its ``target_text``; the split is its task pool's (``validation``, and
``validation_matched`` for MNLI); inputs are padded and truncated to 512 tokens; outputs come from greedy
``generate(max_length=10)``. Scoring lives in :mod:`massmerge.experiments.glue_metrics`.

The attention mask: FusionBench calls ``model.generate(input_ids, max_length=10)`` without one. transformers 4.x
inferred it from the pad id (``input_ids != pad``) for every model, so its figures were computed with the pad
tokens masked; transformers 5.x infers it for decoder-only models only, and the same call then lets the encoder
attend to every pad token of the 512. We always pass the tokenizer's mask: the protocol as its figures ran.

Data: ``nyu-mll/glue`` on the hub holds one folder per task with ``{split}-NNNNN-of-NNNNN.parquet`` files. Only
the named split's files are fetched and read (the train split is large and the test split has no labels).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from massmerge.errors import MassMergeError, OptionError
from massmerge.sources import resolve_source

GLUE_TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")
REGRESSION_TASKS = ("stsb",)

#: Prompt templates, verbatim from FusionBench (typos kept: they are what the experts were trained on).
TEMPLATES: dict[str, str] = {
    "cola": "Indicate if the following sentence is grammatically correct or not: \"{sentence}\". "
            "Answere 'acceptable' or 'unacceptable'.",
    "mnli": "Does the premise: '{premise}' logically imply, contradict, or is neutral to the hypothesis: "
            "'{hypothesis}'? Answere with 'entailment', 'contradiction', or 'neutral'.",
    "mrpc": "Are the following sentences '{sentence1}' and '{sentence2}' conveying the same meaning? "
            "Answere with 'yes' or 'no'.",
    "qnli": "Given the context: '{sentence}', does the question '{question}' have an answer based on the "
            "information provided? Answer with 'yes' or 'no'.",
    "qqp": "Do the questions '{question1}' and '{question2}' have the same intent? Answere with 'yes' or 'no'.",
    "rte": "Does the text: '{sentence1}' entail that '{sentence2}' is true? Provide 'yes' or 'no'.",
    "sst2": "Given the sentence '{sentence}', determine the sentiment. Is it positive or negative?",
    "stsb": "Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 (completely different) to "
            "5 (completely similar), rate the similarity.",
}

#: The word each class label generates (GLUE's label ids); STS-B's target is its score as ``{:.1f}``.
LABEL_WORDS: dict[str, dict[int, str]] = {
    "cola": {0: "unacceptable", 1: "acceptable"},
    "mnli": {0: "entailment", 1: "neutral", 2: "contradiction"},
    "mrpc": {0: "no", 1: "yes"},
    "qnli": {0: "yes", 1: "no"},
    "qqp": {0: "no", 1: "yes"},
    "rte": {0: "yes", 1: "no"},
    "sst2": {0: "negative", 1: "positive"},
}
STSB_TARGET = "{:.1f}"

#: The parquet columns each template reads.
COLUMNS: dict[str, tuple[str, ...]] = {
    "cola": ("sentence",), "mnli": ("premise", "hypothesis"), "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"), "qqp": ("question1", "question2"), "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence",), "stsb": ("sentence1", "sentence2"),
}

#: The split FusionBench's task pool scores (config/taskpool/flan-t5_glue_text_generation.yaml).
EVAL_SPLITS: dict[str, str] = {task: "validation_matched" if task == "mnli" else "validation" for task in GLUE_TASKS}

MAX_INPUT_LENGTH = 512  # every prompt padded (and truncated) to this many tokens, as FusionBench's tokenizer call
MAX_LENGTH = 10  # generate(max_length=10): at most 10 decoder tokens, the start token included
EVAL_BATCH_SIZE = 32  # FusionBench's task pool batch size

#: Everything above that shapes a score; part of every cache key of a GLUE run.
PROTOCOL = {"name": "fusionbench-flan-t5-glue", "max_input_length": MAX_INPUT_LENGTH, "max_length": MAX_LENGTH,
            "templates": TEMPLATES, "labels": {k: {str(i): w for i, w in v.items()} for k, v in LABEL_WORDS.items()},
            "stsb_target": STSB_TARGET, "decoding": "greedy"}


@dataclass(frozen=True)
class GlueSplit:
    """One task's prompts and target texts (and the raw labels), in file order."""

    task: str
    split: str
    prompts: list[str]
    targets: list[str]
    labels: list[float]
    files: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, max_samples: int | None, seed: int = 0) -> GlueSplit:
        """A seeded random subset (in file order), or the whole split."""
        if max_samples is None or max_samples >= len(self):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self)), max_samples))
        return GlueSplit(self.task, self.split, [self.prompts[i] for i in keep], [self.targets[i] for i in keep],
                         [self.labels[i] for i in keep], self.files)


def check_task(task: str, where: str = "task") -> str:
    """``task`` if it is one of the eight GLUE tasks the protocol defines, else a one-line error."""
    if task not in GLUE_TASKS:
        raise OptionError(f"{where}: '{task}' is not a GLUE task of the Flan-T5 protocol ({', '.join(GLUE_TASKS)})")
    return task


def prompt_of(task: str, row: Mapping[str, Any]) -> str:
    """The prompt of one example (its columns formatted into the task's template)."""
    return TEMPLATES[task].format(**{column: row[column] for column in COLUMNS[task]})


def target_of(task: str, label: float) -> str:
    """The text a right answer generates: the label word, the STS-B score as ``{:.1f}``; an unknown label (GLUE's
    test splits hold -1) gives "" as in FusionBench."""
    if task in REGRESSION_TASKS:
        return STSB_TARGET.format(label)
    return LABEL_WORDS[task].get(int(label), "") if float(label) == int(label) else ""


def split_files(root: Path, task: str, split: str) -> list[Path]:
    """``root/{task}/{split}-*.parquet``: the split's shards only (``validation-`` never matches
    ``validation_matched-``), sorted."""
    return sorted((root / task).glob(f"{split}-*.parquet"))


def read_glue_split(source: str | Path, task: str, *, split: str | None = None, revision: str | None = None,
                    max_samples: int | None = None, seed: int = 0) -> GlueSplit:
    """One task's split from a local folder or a hub dataset id laid out as ``nyu-mll/glue``.

    Only ``{task}/{split}-*.parquet`` is fetched (``allow_patterns``) and read; the other splits are never opened.
    """
    check_task(task)
    split = split or EVAL_SPLITS[task]
    pattern = f"{task}/{split}-*.parquet"
    root = resolve_source(source, revision, allow_patterns=(pattern,), repo_type="dataset")
    files = split_files(root, task, split)
    if not files:
        raise MassMergeError(f"{root}: no {pattern} (the nyu-mll/glue layout: one folder per task, "
                             f"{{split}}-NNNNN-of-NNNNN.parquet)")
    rows = [row for file in files for row in _read_rows(file, (*COLUMNS[task], "label"))]
    if not rows:
        raise MassMergeError(f"{files[0]}: the {task} {split} split is empty")
    labels = [_label(row, files[0]) for row in rows]
    data = GlueSplit(task, split, [prompt_of(task, row) for row in rows], [target_of(task, x) for x in labels],
                     labels, tuple(str(f) for f in files))
    return data.subset(max_samples, seed)


def _read_rows(file: Path, columns: Sequence[str]) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MassMergeError("reading GLUE parquet needs pyarrow: `pip install massmerge[hub]`") from None
    try:
        schema = pq.read_schema(file)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise MassMergeError(f"{file}: not a parquet file ({type(exc).__name__})") from None
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise MassMergeError(f"{file}: no column '{missing[0]}' (has {', '.join(schema.names)})")
    return pq.read_table(file, columns=list(columns)).to_pylist()


def _label(row: Mapping[str, Any], file: Path) -> float:
    value = row["label"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MassMergeError(f"{file}: column 'label' holds {type(value).__name__}, not a number")
    return value


__all__ = ["COLUMNS", "EVAL_BATCH_SIZE", "EVAL_SPLITS", "GLUE_TASKS", "LABEL_WORDS", "MAX_INPUT_LENGTH",
           "MAX_LENGTH", "PROTOCOL", "REGRESSION_TASKS", "STSB_TARGET", "TEMPLATES", "GlueSplit", "check_task",
           "prompt_of", "read_glue_split", "split_files", "target_of"]
