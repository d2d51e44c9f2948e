"""``POST /v1/generate`` on a real ``massmerge serve`` of a tiny generating T5 artifact (built here, no heads):
answers equal ``Predictor.generate``'s rows, streamed chunks (server-sent events) join to the same text, bad
generation options and streaming misuse are one-line 4xx, and ``/v1/predict`` refuses the artifact in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from glue_fixtures import SENTENCES, save_full_expert, widened_base
from server_fixtures import serving

from massmerge.artifact.predictor import Predictor
from massmerge.cli import main

transformers = pytest.importorskip("transformers")
GENERATION = {"max_new_tokens": 6}
ROUTER = {"eta": 0.0, "top_k": 2, "tau": 0.05}


@pytest.fixture(scope="module")
def generating(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("servegen")
    base = widened_base(root)
    experts = [save_full_expert(base, root / f"full_{t}", 10 + i, scale=1.5) for i, t in enumerate("abc")]
    main(["build", "--base", str(base), "--experts", *map(str, experts), "--task-names", "a", "b", "c",
          "--output", str(root / "art"), "--max-size", "0"])
    return root / "art"


def _events(body: str) -> list[str]:
    return [line.removeprefix("data: ") for line in body.split("\n\n") if line.startswith("data: ")]


def test_generate_answers_streams_and_refuses_in_one_line(generating: Path) -> None:
    prompts = list(SENTENCES[:4])
    expected = Predictor(generating).generate(prompts, GENERATION, router=ROUTER)
    with serving(generating) as server:
        c = server.client
        got = c.post("/v1/generate", json={"inputs": prompts, "settings": ROUTER, "generation": GENERATION})
        assert got.status_code == 200, got.text
        rows = got.json()["generations"]
        assert rows == [{k: v for k, v in row.items() if k != "index"} for row in expected]
        spoken = [prompt for prompt, row in zip(prompts, rows) if row["text"]]
        assert spoken, rows

        one = {"inputs": [spoken[0]], "settings": ROUTER, "generation": GENERATION}
        whole = c.post("/v1/generate", json=one).json()["generations"][0]
        streamed = c.post("/v1/generate", json={**one, "stream": True})
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
        events = _events(streamed.text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e)["text"] for e in events[:-2]]
        final = json.loads(events[-2])
        assert chunks, events
        assert "".join(chunks) == whole["text"] == final["text"]
        assert final == whole  # selected, probs, text

        bad = [({"generation": {"num_beams": 0}}, "generation.num_beams"),
               ({"generation": {"temperature": -1.0}}, "generation.temperature"),
               ({"generation": {"beams": 2}}, "generation.beams: unknown field"),
               ({"settings": {"eta": -1.0}}, "settings.eta"),
               ({"stream": True, "inputs": ["a", "b"]}, "stream: streaming takes exactly one input"),
               ({"stream": True, "generation": {"num_beams": 2}}, "generation.num_beams: streaming"),
               ({"inputs": []}, "inputs"),
               ({"prompt": "x"}, "prompt: unknown field")]
        for change, named in bad:
            answer = c.post("/v1/generate", json={"inputs": [prompts[0]], **change})
            assert 400 <= answer.status_code < 500, (change, answer.text)
            line = answer.json()["error"]
            assert line.startswith(named) and "\n" not in line, (change, line)
        refused = c.post("/v1/predict", json={"inputs": prompts})
        assert refused.status_code == 501 and "use /v1/generate" in refused.json()["error"]
        assert "\n" not in refused.json()["error"]
        assert c.post("/v1/generate", json=one).json()["generations"][0] == whole  # still up, same answer


def test_a_classifier_still_refuses_generate(text_artifact: Path) -> None:
    with serving(text_artifact) as server:
        answer = server.client.post("/v1/generate", json={"inputs": ["w1"]})
        assert answer.status_code == 501 and "use /v1/predict" in answer.json()["error"]
