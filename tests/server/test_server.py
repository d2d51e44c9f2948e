"""``massmerge serve`` end to end: real server processes on free loopback ports, real HTTP clients (httpx)."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import serving, start_server

from massmerge.cli import main

TEXTS = ["w1 w2 cat", "spam spam w3", "mat w9 w10 w11", "w5", "w7 w7 w7 w7 w8", "cat mat", "w30 w31 spam",
         "w12", "w20 w21 w22 w23 w24 w25", "mat mat", "w3 cat w4", "w39"]


def _cli_rows(art: Path, texts: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> list[dict]:
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(texts) + "\n")
    capsys.readouterr()
    main(["predict", str(art), str(inputs), *flags])
    return [{k: v for k, v in json.loads(line).items() if k != "index"} for line in capsys.readouterr().out.splitlines()]


def _same(rows: list[dict], expected: list[dict]) -> None:
    """Exact task, class and task set; probs to float rounding (a batch's padding moves the last digit)."""
    assert [(r["task"], r["label"], r["class"], r["selected"]) for r in rows] == \
        [(r["task"], r["label"], r["class"], r["selected"]) for r in expected]
    for row, want in zip(rows, expected):
        assert row["probs"] == pytest.approx(want["probs"], abs=2e-6)


def test_concurrent_clients_get_predicts_rows(text_artifact, tmp_path, capsys):
    expected = _cli_rows(text_artifact, TEXTS, tmp_path, capsys)
    with serving(text_artifact, "--max-wait-ms", "20") as server:
        assert server.client.get("/healthz").json() == {"status": "ok"}
        requests = [TEXTS[i % len(TEXTS):] + TEXTS[:i % len(TEXTS)] for i in range(24)]  # rotations, 12 inputs each

        def ask(texts: list[str]) -> list[dict]:
            with httpx.Client(base_url=server.address, timeout=30) as client:
                answer = client.post("/v1/predict", json={"inputs": texts})
                assert answer.status_code == 200, answer.text
                return answer.json()["predictions"]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, requests))
        for i, rows in enumerate(answers):
            shift = i % len(TEXTS)
            _same(rows, expected[shift:] + expected[:shift])
        metrics = server.client.get("/metrics").text
        assert 'massmerge_requests_total{code="200",endpoint="/v1/predict"} 24.0' in metrics
        assert "massmerge_inputs_total 288.0" in metrics
        batches = float(next(l.split()[-1] for l in metrics.splitlines() if l.startswith("massmerge_batch_inputs_count")))
        assert batches < 24  # requests shared model calls
        assert 'massmerge_routed_inputs_total{task_set="' in metrics
    assert "device: cpu" in server.output
