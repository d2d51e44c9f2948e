"""The serving core: a Predictor loaded once answers lists of inputs with predict's rows, per-request router
settings as a view, bad inputs and settings one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_text_artifact

from massmerge.artifact import load
from massmerge.artifact.predictor import REQUEST_SETTINGS, Predictor, image_from_bytes
from massmerge.cli import main
from massmerge.errors import MassMergeError, OptionError

TEXTS = ["w1 w2 cat", "spam spam w3", "mat w9 w10 w11", "w5", "w7 w7 w7 w7 w8", "cat mat"]


@pytest.fixture(scope="module")
def text_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT (word-level tokenizer) with 3 perturbed experts, built by ``massmerge build``."""
    pytest.importorskip("transformers")
    return build_tiny_text_artifact(tmp_path_factory.mktemp("predictor"))


def _cli_rows(art: Path, texts: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> list[dict]:
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(texts) + "\n")
    capsys.readouterr()
    main(["predict", str(art), str(inputs), *flags])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_predict_equals_the_cli_rows(text_artifact, tmp_path, capsys):
    predictor = Predictor(text_artifact, batch_size=4)
    rows = predictor.predict(TEXTS)
    cli = _cli_rows(text_artifact, TEXTS, tmp_path, capsys, "--batch-size", "4")
    assert [r["index"] for r in rows] == list(range(len(TEXTS)))
    strip = [{k: v for k, v in r.items() if k != "index"} for r in rows]
    assert strip == [{k: v for k, v in r.items() if k != "index"} for r in cli]
    assert predictor.predict(TEXTS) == rows  # loaded once, asked again: the same answers
    assert predictor.predict([]) == []


def test_rows_equal_the_dense_per_set_reference(text_artifact):
    """Every row's task and class equal the reference strategy's (a dense rebuild per task set)."""
    rows = Predictor(text_artifact, batch_size=2).predict(TEXTS)
    reference = Predictor(text_artifact, batch_size=len(TEXTS), strategy="reference").predict(TEXTS)
    assert [(r["task"], r["label"], r["selected"]) for r in rows] == \
        [(r["task"], r["label"], r["selected"]) for r in reference]


def test_per_request_settings_equal_a_model_loaded_with_them(text_artifact):
    predictor = Predictor(text_artifact)
    settings = {"top_k": 1, "eta": 0.05, "head_rule": "posterior"}
    viewed = predictor.predict(TEXTS, settings=settings)
    loaded = Predictor(text_artifact, **settings).predict(TEXTS)
    assert viewed == loaded
    assert all(len(r["selected"]) == 1 for r in viewed)
    assert predictor.view(settings) is predictor.view(dict(settings))  # views are kept, not rebuilt per request
    assert predictor.predict(TEXTS) == Predictor(text_artifact).predict(TEXTS)  # the view left the model as it was


@pytest.mark.parametrize(("settings", "fragment"), [
    ({"batch_size": 3}, "settings.batch_size: not a per-request setting"),
    ({"eta": 1.5}, "--eta"),
    ({"mode": "nope"}, "--mode"),
])
def test_bad_per_request_settings_are_one_line(text_artifact, settings, fragment):
    with pytest.raises(OptionError, match="^" + fragment.replace(".", r"\.").replace("-", r"\-")) as info:
        Predictor(text_artifact).predict(TEXTS, settings=settings)
    assert "\n" not in str(info.value)
    assert set(REQUEST_SETTINGS) == {"mode", "eta", "top_k", "tau", "head_rule"}


def test_a_non_text_input_is_named(text_artifact):
    with pytest.raises(OptionError, match=r"^inputs\[1\]: expected a text, got int$"):
        Predictor(text_artifact).predict(["w1", 3])


def test_overrides_checked_before_loading(text_artifact):
    with pytest.raises(OptionError, match="--top-k"):
        Predictor(text_artifact, top_k=0)


def test_undecodable_image_bytes_are_one_line():
    with pytest.raises(MassMergeError, match=r"^inputs\[0\]: not a decodable image") as info:
        image_from_bytes(b"not an image", "inputs[0]")
    assert "\n" not in str(info.value)


def test_predictor_model_is_the_loaded_artifact(text_artifact):
    """The predictor's model answers as load() does (one engine)."""
    predictor = Predictor(text_artifact)
    model = load(text_artifact)
    batch = predictor.collate(predictor.prepare(TEXTS, [str(i) for i in range(len(TEXTS))]))
    assert torch.equal(predictor.model(batch).task, model(batch).task)
