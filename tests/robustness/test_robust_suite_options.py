"""``massmerge suite`` refuses bad options before any fine-tuning starts (one line, exit 2, nothing written)."""

from __future__ import annotations

import pytest
from robust_helpers import assert_user_error, run_cli

pytest.importorskip("massmerge.suite")


@pytest.mark.parametrize(("options", "culprit"), [
    (["--steps", "0"], "--steps"),
    (["--n-test", "0"], "--n-test"),
    (["--eta", "1.5"], "--eta"),
    (["--eta", "-0.2"], "--eta"),
    (["--top-k", "0"], "--top-k"),
    (["--rank-scale", "0"], "--rank-scale"),
    (["--rank-scale", "1.5"], "--rank-scale"),
    (["--eps", "2"], "--eps"),
    (["--preset", "nope"], "--preset"),
    (["--tasks", "no_such_task"], "no_such_task"),
])
def test_suite_bad_option_fails_fast(tmp_path, capsys, monkeypatch, options, culprit) -> None:
    from massmerge import finetune

    def no_training(*args, **kwargs):
        raise AssertionError("fine-tuning started before the options were checked")

    monkeypatch.setattr(finetune, "finetune_expert", no_training)
    cache, out = tmp_path / "cache", tmp_path / "out"
    result = run_cli(["suite", *options, "--cache-dir", cache, "--out", out, "--threads", "1"], capsys)
    assert_user_error(result, culprit)
    assert not out.exists()
    assert not (cache / "experts").exists()
