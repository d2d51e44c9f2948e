"""An artifact that generates: ``massmerge build`` of tiny Flan-T5 replicas (full and LoRA experts, no heads),
``massmerge predict`` writing ``selected``/``probs``/``text`` per prompt, ``load(ART).generate`` with HF's
arguments and ``Predictor.generate``; every row equal to the dense reference of its prompt's task set. Old
artifacts (no ``output`` field) still classify; bad input is one line."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from glue_fixtures import SENTENCES, save_full_expert, save_lora_expert, widened_base

from massmerge.artifact import load, read_manifest
from massmerge.artifact.predictor import Predictor
from massmerge.cli import main
from massmerge.errors import MassMergeError, OptionError

transformers = pytest.importorskip("transformers")
PROMPTS = [*SENTENCES, "the cat " * 40]  # the last one is above the tiny limit below


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("genart")
    base = widened_base(root, max_length=24)
    full = [save_full_expert(base, root / f"full_{t}", 10 + i, scale=1.5) for i, t in enumerate("abc")]
    lora = [save_lora_expert(base, root / f"lora_{t}", 20 + i, base_id=str(base)) for i, t in enumerate("abc")]
    out = {}
    for kind, experts in (("full", full), ("lora", lora)):
        main(["build", "--base", str(base), "--experts", *map(str, experts), "--task-names", "a", "b", "c",
              "--output", str(root / f"art_{kind}"), "--max-size", "0"])
        out[kind] = root / f"art_{kind}"
    return out


def dense_rows(art: Path, prompts: list[str], options: dict) -> tuple[list[tuple[int, ...]], list[str]]:
    """Route with the loaded artifact, then generate each prompt with a plain T5 holding its set's dense
    reference weights (the artifact's own base and factors)."""
    mass = load(art, eta=0.0, top_k=2, tau=0.05)
    tok = transformers.AutoTokenizer.from_pretrained(art / "model")
    batch = dict(tok(prompts, truncation=True, max_length=24, padding=True, return_tensors="pt"))
    selected = mass.route(batch).selected
    rows = [tuple(r.nonzero().flatten().tolist()) for r in selected]
    plain = transformers.T5ForConditionalGeneration.from_pretrained(art / "model").eval()
    texts = {}
    for tasks in set(rows):
        rebuilt = copy.deepcopy(plain)
        rebuilt.load_state_dict(mass.reference_state(tasks), strict=False)
        texts[tasks] = tok.batch_decode(rebuilt.generate(**batch, **options), skip_special_tokens=True)
    return rows, [texts[tasks][i] for i, tasks in enumerate(rows)]


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_predict_load_and_the_predictor_generate_each_prompts_dense_text(artifacts, kind, tmp_path, capsys) -> None:
    art = artifacts[kind]
    manifest = read_manifest(art)
    assert manifest.output == "generate" and manifest.heads == []
    assert (art / "model" / "tokenizer.json").is_file() and (art / "model" / "generation_config.json").is_file()
    options = {"max_new_tokens": 5, "num_beams": 2}
    names, texts = dense_rows(art, PROMPTS, options)
    assert len(set(names)) > 1  # mixed task sets
    inputs = tmp_path / "prompts.txt"
    inputs.write_text("\n".join(PROMPTS) + "\n")
    capsys.readouterr()
    main(["predict", str(art), str(inputs), "--max-new-tokens", "5", "--num-beams", "2", "--eta", "0", "--top-k",
          "2", "--tau", "0.05"])
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["text"] for r in rows] == texts
    assert [tuple("abc".index(t) for t in r["selected"]) for r in rows] == names
    assert [r["index"] for r in rows] == list(range(1, len(PROMPTS) + 1))
    assert abs(sum(rows[0]["probs"].values()) - 1) < 1e-4
    assert f"note: line {len(PROMPTS)}: prompt of" in captured.err and "cut to the model's limit of 24" in captured.err
    predictor = Predictor(art, eta=0.0, top_k=2, tau=0.05)
    assert [r["text"] for r in predictor.generate(PROMPTS, {"max_new_tokens": 5}, num_beams=2)] == texts
    mass = load(art, eta=0.0, top_k=2, tau=0.05)
    tok = predictor.tokenizer
    batch = dict(tok(PROMPTS[:4], padding=True, return_tensors="pt"))
    out = mass.generate(batch, max_new_tokens=5, num_beams=2)
    assert tok.batch_decode(out.sequences, skip_special_tokens=True) == texts[:4]


def test_the_predictor_generates_a_window_in_set_order_and_answers_in_input_order(artifacts, monkeypatch) -> None:
    """Prompts are routed a window at a time and generated in batches cut in set order (few sets per decode
    step); each row is still its own prompt's dense text, in the input's order."""
    from massmerge.mass.batch import set_order
    from massmerge.mass.model import MASSModel

    art, options = artifacts["full"], {"max_new_tokens": 5}
    prompts = PROMPTS[:-1] * 2
    names, texts = dense_rows(art, prompts, options)
    assert names != sorted(names)  # the input interleaves the sets
    seen: list[tuple[int, ...]] = []
    real = MASSModel.generate

    def spy(self, batch, **kwargs):
        seen.extend(tuple(row.nonzero().flatten().tolist()) for row in kwargs["routing"].selected)
        return real(self, batch, **kwargs)

    monkeypatch.setattr(MASSModel, "generate", spy)
    rows = Predictor(art, eta=0.0, top_k=2, tau=0.05, batch_size=2).generate(prompts, options)
    assert [r["text"] for r in rows] == texts
    assert [tuple("abc".index(t) for t in r["selected"]) for r in rows] == names
    assert [r["index"] for r in rows] == list(range(len(prompts)))
    assert seen == sorted(names)  # one window (8 batches of 2), generated in set order
    seen.clear()
    again = Predictor(art, eta=0.0, top_k=2, tau=0.05, batch_size=1)
    rows = again.generate(prompts, options)  # two windows of 8 batches of 1: the second walks the sets backwards
    assert [r["text"] for r in rows] == texts
    assert seen == sorted(names[:8]) + sorted(names[8:], reverse=True)
    # rows' sets {1}, {0}, {1}, {0, 1}: (0,) < (0, 1) < (1,), rows in order within a set
    assert set_order(torch.tensor([[0, 1], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)).tolist() == [1, 3, 0, 2]


def test_generate_with_the_routing_of_other_prompts_is_one_line(artifacts) -> None:
    mass = load(artifacts["full"])
    tok = transformers.AutoTokenizer.from_pretrained(artifacts["full"] / "model")
    batch = dict(tok(PROMPTS[:3], padding=True, return_tensors="pt"))
    routing = mass.route(batch)
    with pytest.raises(OptionError, match="generate: routing= holds 2 prompts, the batch 3"):
        mass.generate(batch, routing=routing.rows(torch.tensor([0, 1])), max_new_tokens=2)


def error_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_generation_input_is_one_line(artifacts, tmp_path, capsys) -> None:
    art = artifacts["full"]
    inputs = tmp_path / "p.txt"
    inputs.write_text("the cat\n")
    for flags, fragment in ((["--num-beams", "0"], "--num-beams: "), (["--top-p", "2", "--do-sample"], "--top-p: "),
                            (["--temperature", "0"], "--temperature: "),
                            (["--restart-block", "1"], "--restart-block 1: ")):
        assert fragment in error_line(["predict", str(art), str(inputs), *flags], capsys)
    line = error_line(["build", "--base", str(art / "model"), "--experts", str(art / "model"), str(art / "model"),
                       "--heads", str(inputs), "--output", str(tmp_path / "x")], capsys)
    assert "--heads: family seq2seq generates text" in line
    with pytest.raises(OptionError, match="no class heads"):
        Predictor(art).predict(["the cat"])


def test_an_artifact_without_an_output_field_classifies(artifacts, tmp_path) -> None:
    """Artifacts written before generation existed have no 'output' field: they read as classify (and a
    classify artifact must list one head per task)."""
    art = tmp_path / "old"
    shutil.copytree(artifacts["full"], art)
    raw = json.loads((art / "manifest.json").read_text())
    raw.pop("output")
    (art / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(MassMergeError, match="field 'heads' does not list one head per task"):
        read_manifest(art)
