"""``massmerge serve`` end to end: real server processes on free loopback ports, real HTTP clients (httpx)."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from server_fixtures import serving, start_server

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


def _metrics_when(server, line: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while line not in (metrics := server.client.get("/metrics").text) and time.monotonic() < deadline:
        time.sleep(0.05)
    return metrics


@pytest.fixture(scope="module")
def shared(text_artifact):
    """One server for the checks that leave it as it was; the last test stops it with SIGINT."""
    server = start_server(text_artifact, "--max-inputs", "16", "--max-input-chars", "200")
    yield server
    if server.process.poll() is None:
        server.stop()


def test_concurrent_clients_get_predicts_rows(shared, text_artifact, tmp_path, capsys):
    expected = _cli_rows(text_artifact, TEXTS, tmp_path, capsys)
    server = shared
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
    metrics = _metrics_when(server, "massmerge_inputs_total 288.0")  # a batch is counted just after it answers
    assert 'massmerge_requests_total{code="200",endpoint="/v1/predict"} 24.0' in metrics
    assert "massmerge_inputs_total 288.0" in metrics
    batches = float(next(l.split()[-1] for l in metrics.splitlines() if l.startswith("massmerge_batch_inputs_count")))
    assert batches < 24  # requests shared model calls
    assert 'massmerge_routed_inputs_total{task_set="' in metrics
    assert "device: cpu" in server.output and server.address.startswith("http://127.0.0.1:")


def test_per_request_settings_group_apart(shared, text_artifact, tmp_path, capsys):
    default = _cli_rows(text_artifact, TEXTS, tmp_path, capsys)
    top1 = _cli_rows(text_artifact, TEXTS, tmp_path, capsys, "--top-k", "1", "--head-rule", "posterior")
    bodies = [{"inputs": TEXTS} if i % 2 else {"inputs": TEXTS, "top_k": 1, "head_rule": "posterior"}
              for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: shared.client.post("/v1/predict", json=body), bodies))
    for body, answer in zip(bodies, answers):
        assert answer.status_code == 200, answer.text
        _same(answer.json()["predictions"], top1 if "top_k" in body else default)
    assert all(len(r["selected"]) == 1 for r in answers[0].json()["predictions"])


BAD_REQUESTS = [
    (b'{"inputs": ["w1", ', 400, r"^body: malformed JSON \("),
    (b'{"inputs": ["w1 \xff"]}', 400, r"^body: not UTF-8 \(byte 0xff at offset 16\)$"),
    (b'["w1"]', 422, r"^body: expected a JSON object"),
    (b'{"inputs": "w1"}', 422, r"^inputs: Input should be a valid (list|array)"),
    (b'{"inputs": ["w1", 3]}', 422, r"^inputs\[1\]: Input should be a valid string \(got 3\)$"),
    (b'{"inputs": []}', 422, r"^inputs: List should have at least 1 item"),
    (b'{}', 422, r"^inputs: Field required"),
    (b'{"inputs": ["w1"], "task": "t0"}', 422, r"^task: unknown field \(a request holds inputs, mode, eta"),
    (b'{"inputs": ["w1"], "eta": 1.5}', 422, r"^eta: Input should be less than 1"),
    (b'{"inputs": ["w1"], "top_k": 0}', 422, r"^top_k: "),
    (b'{"inputs": ["w1"], "tau": "hot"}', 422, r"^tau: Input should be a valid number"),
    (b'{"inputs": ["w1"], "mode": "all"}', 422, r"^mode: Input should be 'topk', 'top1' or 'batch'"),
    (b'{"inputs": ["w1"], "head_rule": 3}', 422, r"^head_rule: "),
    (json.dumps({"inputs": ["w1"] * 17}).encode(), 422, r"^inputs: 17 inputs, more than --max-inputs 16$"),
    (json.dumps({"inputs": ["w1", "w2 " * 100]}).encode(), 422,
     r"^inputs\[1\]: 300 characters, more than --max-input-chars 200$"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_are_one_line_4xx(shared, body, status, message):
    answer = shared.client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert re.search(message, error) and "\n" not in error, error


def test_the_server_survives_bad_requests_and_answers_the_rest(shared):
    good = {"inputs": TEXTS[:4]}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: shared.client.post("/v1/predict", content=BAD_REQUESTS[i % 15][0]
                                                             if i % 2 else json.dumps(good).encode()), range(16)))
    assert all(a.status_code == 200 for a in answers[::2]) and all(400 <= a.status_code < 500 for a in answers[1::2])
    assert shared.client.get("/readyz").json() == {"status": "ready"}


def test_endpoints_generate_openapi_and_unknown_paths(shared):
    generate = shared.client.post("/v1/generate", json={"inputs": ["w1"]})
    assert generate.status_code == 501 and "classifier" in generate.json()["error"]
    spec = shared.client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/generate", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"inputs", "mode", "eta", "top_k", "tau", "head_rule"}
    missing = shared.client.get("/v2/nothing")
    assert missing.status_code == 404 and missing.json() == {"error": "/v2/nothing: no such endpoint (see /docs)"}
    assert shared.client.get("/v1/predict").status_code == 405
    assert shared.client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_sigint_drains_and_exits_zero(shared):
    assert shared.stop(signal.SIGINT) == 0
    assert "draining" in shared.output


def test_back_pressure_limits_and_auth(text_artifact):
    with serving(text_artifact, "--max-queue", "4", "--max-wait-ms", "2500", "--request-timeout-s", "0.8",
                 "--max-body-bytes", "2000", key="sesame", env={"MASSMERGE_API_KEY": "sesame"}) as server:
        anonymous = httpx.post(f"{server.address}/v1/predict", json={"inputs": ["w1"]})
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
        wrong = httpx.get(f"{server.address}/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json() == {"error": "Authorization: wrong API key"}
        assert httpx.get(f"{server.address}/healthz").status_code == 200  # probes need no key
        big = server.client.post("/v1/predict", content=b'{"inputs": ["' + b"w1 " * 1000 + b'"]}')
        assert big.status_code == 413 and big.json()["error"] == "body: 3016 bytes, more than --max-body-bytes 2000"
        chunks = iter([b'{"inputs": ["', b"w1 " * 1000, b'"]}'])  # no Content-Length: counted as it streams in
        streamed = server.client.post("/v1/predict", content=chunks)
        assert streamed.status_code == 413 and streamed.json()["error"] == "body: more than --max-body-bytes 2000 bytes"
        first: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: first.append(server.client.post("/v1/predict",
                                                                                   json={"inputs": TEXTS[:3]})))
        waiting.start()
        time.sleep(0.3)  # the first request waits in the queue (--max-wait-ms), holding 3 of 4 places
        full = server.client.post("/v1/predict", json={"inputs": TEXTS[:2]})
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert full.json()["error"].startswith("the queue is full (3 of 4 inputs waiting)")
        waiting.join()
        assert first[0].status_code == 504 and "--request-timeout-s 0.8" in first[0].json()["error"]
        assert "massmerge_queue_inputs 0.0" in server.client.get("/metrics").text  # the timed-out request left
        # a hard kill cuts an in-flight request off: the client sees a closed connection, never a partial answer
        cut: list[object] = []

        def ask() -> None:
            try:
                cut.append(server.client.post("/v1/predict", json={"inputs": TEXTS[:2]}, timeout=10))
            except httpx.TransportError as exc:
                cut.append(exc)

        asking = threading.Thread(target=ask)
        asking.start()
        time.sleep(0.3)
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
        asking.join()
        assert isinstance(cut[0], httpx.TransportError), cut


def test_sigterm_finishes_in_flight_requests_then_exits_zero(text_artifact, tmp_path, capsys):
    expected = _cli_rows(text_artifact, TEXTS[:5], tmp_path, capsys)
    server = start_server(text_artifact, "--max-wait-ms", "1500", "--grace-s", "20")
    answers: list[httpx.Response] = []
    asking = threading.Thread(target=lambda: answers.append(server.client.post("/v1/predict",
                                                                               json={"inputs": TEXTS[:5]})))
    asking.start()
    time.sleep(0.3)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with httpx.Client(base_url=server.address) as probe:
        ready = probe.get("/readyz")
        late = probe.post("/v1/predict", json={"inputs": ["w1"]})
    assert ready.status_code == 503 and ready.json() == {"status": "draining"}
    assert late.status_code == 503 and "shutting down" in late.json()["error"]
    asking.join()
    assert answers[0].status_code == 200
    _same(answers[0].json()["predictions"], expected)
    assert server.stop(timeout=20) == 0
    assert "draining" in server.output


def test_non_loopback_without_key_is_refused(text_artifact, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(text_artifact), "--host", "0.0.0.0"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --host: binding to 0.0.0.0 lets every machine") and "--allow-no-key" in error


def test_exposure_rule():
    from massmerge.server.run import check_exposure, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and not is_loopback("0.0.0.0")
    assert check_exposure("127.0.0.1", None, False) is None and check_exposure("0.0.0.0", "key", False) is None
    warning = check_exposure("0.0.0.0", None, True)
    assert warning is not None and warning.startswith("warning: binding to 0.0.0.0") and "\n" not in warning
