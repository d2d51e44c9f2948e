"""FusionBench's Flan-T5 GLUE protocol: the templates and label words verbatim, the split names, and a reader of
nyu-mll/glue's parquet layout that opens only the named split."""

from __future__ import annotations

from pathlib import Path

import pytest
from glue_fixtures import save_glue

from massmerge.data import glue
from massmerge.errors import MassMergeError, OptionError

# A copy of tanganke/fusion_bench fusion_bench/tasks/flan_t5_text_generation/glue_prompt_templates.py at commit
# 54c9e8c9d9621620c720452cd8533332a32d3689 (read through the fetch tool), typos and all.
FUSION_BENCH_TEMPLATES = {
    "cola": {
        "input_text": "Indicate if the following sentence is grammatically correct or not: \"{sentence}\". Answere 'acceptable' or 'unacceptable'.",
        "target_text": {"0": "unacceptable", "1": "acceptable"},
    },
    "mnli": {
        "input_text": "Does the premise: '{premise}' logically imply, contradict, or is neutral to the hypothesis: '{hypothesis}'? Answere with 'entailment', 'contradiction', or 'neutral'.",
        "target_text": {"0": "entailment", "1": "neutral", "2": "contradiction"},
    },
    "mrpc": {
        "input_text": "Are the following sentences '{sentence1}' and '{sentence2}' conveying the same meaning? Answere with 'yes' or 'no'.",
        "target_text": {"0": "no", "1": "yes"},
    },
    "qnli": {
        "input_text": "Given the context: '{sentence}', does the question '{question}' have an answer based on the information provided? Answer with 'yes' or 'no'.",
        "target_text": {"0": "yes", "1": "no"},
    },
    "qqp": {
        "input_text": "Do the questions '{question1}' and '{question2}' have the same intent? Answere with 'yes' or 'no'.",
        "target_text": {"0": "no", "1": "yes"},
    },
    "rte": {
        "input_text": "Does the text: '{sentence1}' entail that '{sentence2}' is true? Provide 'yes' or 'no'.",
        "target_text": {"0": "yes", "1": "no"},
    },
    "sst2": {
        "input_text": "Given the sentence '{sentence}', determine the sentiment. Is it positive or negative?",
        "target_text": {"0": "negative", "1": "positive"},
    },
    "stsb": {
        "input_text": "Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 (completely different) to 5 (completely similar), rate the similarity.",
        "target_text": "{:.1f}",
    },
}
# config/taskpool/flan-t5_glue_text_generation.yaml at the same commit.
FUSION_BENCH_SPLITS = {"cola": "validation", "mnli": "validation_matched", "mrpc": "validation",
                       "qnli": "validation", "qqp": "validation", "rte": "validation", "sst2": "validation",
                       "stsb": "validation"}


def test_templates_and_label_words_are_fusion_bench_verbatim() -> None:
    assert set(glue.TEMPLATES) == set(FUSION_BENCH_TEMPLATES) == set(glue.GLUE_TASKS)
    for task, template in FUSION_BENCH_TEMPLATES.items():
        assert glue.TEMPLATES[task] == template["input_text"], task
        if task == "stsb":
            assert glue.STSB_TARGET == template["target_text"]
        else:
            assert {str(k): v for k, v in glue.LABEL_WORDS[task].items()} == template["target_text"], task
    assert glue.EVAL_SPLITS == FUSION_BENCH_SPLITS
    assert (glue.MAX_INPUT_LENGTH, glue.MAX_LENGTH) == (512, 10)


def test_prompts_and_targets_by_hand() -> None:
    row = {"sentence1": "A man plays.", "sentence2": "Someone plays."}
    assert glue.prompt_of("rte", row) == "Does the text: 'A man plays.' entail that 'Someone plays.' is true? Provide 'yes' or 'no'."
    assert glue.target_of("rte", 1) == "no"
    assert glue.target_of("mnli", 2) == "contradiction"
    assert glue.target_of("cola", -1) == ""  # GLUE's unlabeled test rows, as FusionBench
    assert glue.target_of("stsb", 3.799999952316284) == "3.8"  # a float32 label, as parquet gives it back
    assert glue.target_of("stsb", 5.0) == "5.0"


def test_reader_opens_only_the_named_split(tmp_path: Path) -> None:
    root = save_glue(tmp_path / "glue", rows=5, tasks=("mnli", "cola", "stsb"))
    # the train/test files beside are garbage: reading any of them would raise
    mnli = glue.read_glue_split(root, "mnli")
    assert mnli.split == "validation_matched" and len(mnli) == 5
    assert [Path(f).name for f in mnli.files] == ["validation_matched-00000-of-00001.parquet"]
    assert all(p.startswith("Does the premise: '") for p in mnli.prompts)
    assert set(mnli.targets) <= {"entailment", "neutral", "contradiction"}
    stsb = glue.read_glue_split(root, "stsb")
    assert all(t == f"{x:.1f}" for t, x in zip(stsb.targets, stsb.labels, strict=True))
    with pytest.raises(MassMergeError, match="not a parquet file"):
        glue.read_glue_split(root, "cola", split="train")
    with pytest.raises(MassMergeError, match="no cola/validation_x-"):
        glue.read_glue_split(root, "cola", split="validation_x")


def test_subset_is_seeded_and_in_file_order(tmp_path: Path) -> None:
    root = save_glue(tmp_path / "glue", rows=8, tasks=("sst2",))
    whole = glue.read_glue_split(root, "sst2")
    part = glue.read_glue_split(root, "sst2", max_samples=3, seed=1)
    assert part == glue.read_glue_split(root, "sst2", max_samples=3, seed=1)
    positions = [whole.prompts.index(p) for p in part.prompts]
    assert len(part) == 3 and positions == sorted(positions)


def test_bad_inputs_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="'wnli' is not a GLUE task"):
        glue.read_glue_split(tmp_path, "wnli")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "rte").mkdir()
    pq.write_table(pa.table({"sentence1": ["a"], "label": [0]}), tmp_path / "rte" / "validation-00000-of-00001.parquet")
    with pytest.raises(MassMergeError, match="no column 'sentence2'") as info:
        glue.read_glue_split(tmp_path, "rte")
    assert "\n" not in str(info.value)
