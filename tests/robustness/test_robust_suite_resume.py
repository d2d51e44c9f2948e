"""Killing the offline suite during expert fine-tuning and during evaluation, then rerunning, resumes from the
cache and gives the same report (accuracy numbers; timings excluded) as an uninterrupted run.

Slow (it runs the suite about twice on the smallest configuration the suite's Python API allows), so it is
marked ``slow``; it skips when the suite or its packaged data is not installed outside CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys, torch
from pathlib import Path
from massmerge.experiments.suite import CI_FINETUNE, SuiteConfig, run_suite
torch.set_num_threads(2)
cache, out = Path(sys.argv[1]), Path(sys.argv[2])
config = SuiteConfig(
    preset="ci", tasks=("wordnet_pos", "quote_language"), n_train=64, n_val=8, n_test=24,
    finetune=CI_FINETUNE.model_copy(update={"steps": 12}),
    methods=("weight_average", "task_arithmetic"),
)
run_suite(config, cache_dir=cache, out_dir=out)
"""

PHASE_TIMEOUT = 1500  # seconds; generous for a loaded 2-core CI machine


def _data_or_skip() -> None:
    try:
        from massmerge.data import load_task
        from massmerge.experiments.suite import SuiteConfig  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"offline suite not available: {exc}")
    from massmerge.errors import MassMergeError

    try:
        for name in ("wordnet_pos", "quote_language"):
            load_task(name, 10, 2, 10)
    except MassMergeError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"suite data not installed: {exc}")


def _start(script: Path, cache: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, str(script), str(cache), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, condition, what: str) -> None:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; fail if it ends or times out first."""
    deadline = time.monotonic() + PHASE_TIMEOUT
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the suite ended (code {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the suite was not killed mid-run ({proc.returncode})"


def _finish(proc: subprocess.Popen) -> None:
    try:
        _, err = proc.communicate(timeout=PHASE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("suite run timed out")
    assert proc.returncode == 0, err[-3000:]


def _experts_done(cache: Path) -> list[Path]:
    return sorted((cache / "experts").glob("*/meta.json")) if (cache / "experts").is_dir() else []


def _evals_done(cache: Path) -> list[Path]:
    return sorted((cache / "evals").glob("*.json")) if (cache / "evals").is_dir() else []


def _accuracies(report: dict) -> dict:
    """Every accuracy-like number of the report's method rows (timings, throughput and serving ratios excluded:
    they are measured clocks, not cached results, whenever a row was computed after the kill)."""
    def keep(value):
        if isinstance(value, dict):
            return {k: keep(v) for k, v in value.items()
                    if not any(word in k for word in ("second", "time", "throughput", "per_s", "serving_ratio"))}
        return value
    return keep(report["methods"])


def test_suite_killed_and_rerun_gives_the_same_report(tmp_path: Path) -> None:
    _data_or_skip()
    script = tmp_path / "run_suite.py"
    script.write_text(SCRIPT)

    # 1. interrupted run: killed once the first expert is cached (the second is training), ...
    cache, out = tmp_path / "cache", tmp_path / "out"
    _kill_when(_start(script, cache, out), lambda: len(_experts_done(cache)) >= 1, "the first expert was cached")
    first_expert = _experts_done(cache)[0]
    first_weights = (first_expert.parent / "expert.safetensors").read_bytes()
    first_meta = first_expert.read_text()
    assert not (out / "report.json").exists()

    # ... rerun, killed once the first evaluation result is cached, ...
    _kill_when(_start(script, cache, out), lambda: len(_evals_done(cache)) >= 1, "the first evaluation was cached")
    assert len(_experts_done(cache)) == 2
    assert first_expert.read_text() == first_meta  # the cached expert was reused, not retrained
    cached_eval = {p: p.read_text() for p in _evals_done(cache)}
    assert not (out / "report.json").exists()

    # ... and rerun to completion.
    _finish(_start(script, cache, out))
    assert (first_expert.parent / "expert.safetensors").read_bytes() == first_weights
    assert first_expert.read_text() == first_meta
    for path, text in cached_eval.items():
        assert path.read_text() == text
    leftovers = [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    resumed = json.loads((out / "report.json").read_text())

    # 2. an uninterrupted run in a fresh cache gives the same numbers
    clean_cache, clean_out = tmp_path / "clean_cache", tmp_path / "clean_out"
    _finish(_start(script, clean_cache, clean_out))
    clean = json.loads((clean_out / "report.json").read_text())
    assert _accuracies(resumed) == _accuracies(clean)
    assert resumed["layer_sweep"] == clean["layer_sweep"]
    assert [t["name"] for t in resumed["tasks"]] == [t["name"] for t in clean["tasks"]]
