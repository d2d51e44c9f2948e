"""``massmerge suite`` refuses bad options before any fine-tuning starts (one line, exit 2, nothing written)."""

from __future__ import annotations

import pytest
from robust_helpers import assert_user_error, run_cli

pytest.importorskip("massmerge.experiments.suite")


@pytest.mark.parametrize(("options", "culprit"), [
    (["--steps", "0"], "--steps"),
    (["--n-test", "0"], "--n-test"),
    (["--eta", "1.5"], "--eta"),
    (["--eta", "-0.2"], "--eta"),
    (["--top-k", "0"], "--top-k"),
    (["--max-size", "0.5"], "--max-size"),
    (["--max-size", "-1"], "--max-size"),
    (["--eps", "2"], "--eps"),
    (["--preset", "nope"], "--preset"),
    (["--tasks", "no_such_task"], "no_such_task"),
    (["--routing-layer", "bogus"], "bogus"),
    (["--routing-layer", "encoder.layer.1.attention"], "encoder.layer.1.attention"),
    (["--mass-layer", "nope"], "nope"),
    (["--threads", "-1"], "--threads"),
    (["--threads", "0"], "--threads"),
    (["--pooling", "max"], "--pooling"),
    (["--head-rule", "vote"], "--head-rule"),
    (["--router", "mine"], "--router"),
])
def test_suite_bad_option_fails_fast(tmp_path, capsys, monkeypatch, options, culprit) -> None:
    from massmerge.experiments import finetune, suite

    def no_training(*args, **kwargs):
        raise AssertionError("fine-tuning started before the options were checked")

    monkeypatch.setattr(finetune, "finetune_expert", no_training)
    monkeypatch.setattr(suite, "finetune_expert", no_training)
    cache, out = tmp_path / "cache", tmp_path / "out"
    threads = [] if "--threads" in options else ["--threads", "1"]
    result = run_cli(["suite", *options, "--cache-dir", cache, "--output", out, *threads], capsys)
    assert_user_error(result, culprit)
    assert not out.exists()
    assert not (cache / "experts").exists()
