"""``massmerge evaluate --config``: broken or hostile benchmark configs fail with one line naming the field,
exit 2, no traceback, no report written; a YAML tag that would build Python objects is never executed."""

from __future__ import annotations

from pathlib import Path

import pytest
from robust_helpers import Zoo, assert_user_error, run_cli

pytest.importorskip("massmerge.experiments.evaluate_config")
pytest.importorskip("yaml")

GOOD_TASKS = """
tasks:
  - {name: a, expert: /nonexistent/a.safetensors, dataset: /nonexistent/a}
  - {name: b, expert: /nonexistent/b.safetensors, dataset: /nonexistent/b}
"""


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(text)
    return path


CASES = [
    ("not_yaml", "base: [unclosed\n", ["bench.yaml"]),
    ("empty", "", ["bench.yaml"]),
    ("no_base", GOOD_TASKS, ["base"]),
    ("one_task", "base: /x\ntasks:\n  - {name: a, expert: /e, dataset: /d}\n", ["tasks"]),
    ("extra_field", "base: /x\nsurprise: 1\n" + GOOD_TASKS, ["surprise"]),
    ("eta", "base: /x\nmass: {eta: 1.5}\n" + GOOD_TASKS, ["eta"]),
    ("top_k", "base: /x\nmass: {top_k: 0}\n" + GOOD_TASKS, ["top_k"]),
    ("rank_fraction", "base: /x\nmass: {rank_fraction: 0}\n" + GOOD_TASKS, ["rank_fraction"]),
    ("tau", "base: /x\nmass: {tau: 0}\n" + GOOD_TASKS, ["tau"]),
    ("method", "base: /x\nmethods: [magic]\n" + GOOD_TASKS, ["magic"]),
    ("duplicate", "base: /x\ntasks:\n  - {name: a, expert: /e, dataset: /d}\n  - {name: a, expert: /e, dataset: /d}\n",
     ["'a'"]),
]


@pytest.mark.parametrize(("name", "text", "culprits"), CASES, ids=[c[0] for c in CASES])
def test_evaluate_bad_config(tmp_path, capsys, name, text, culprits) -> None:
    out = tmp_path / "report"
    result = run_cli(["evaluate", "--config", _config(tmp_path, text), "--output", out], capsys)
    assert_user_error(result, *culprits)
    assert not out.exists()


def test_evaluate_missing_config(tmp_path, capsys) -> None:
    result = run_cli(["evaluate", "--config", tmp_path / "absent.yaml"], capsys)
    assert_user_error(result, "absent.yaml")


def test_evaluate_yaml_python_tag_never_runs(tmp_path, capsys) -> None:
    marker = tmp_path / "PWNED"
    text = f"base: !!python/object/apply:os.system ['touch {marker}']\n" + GOOD_TASKS
    result = run_cli(["evaluate", "--config", _config(tmp_path, text), "--output", tmp_path / "r"], capsys)
    assert_user_error(result, "bench.yaml")
    assert not marker.exists()


def test_evaluate_pickle_expert_never_runs(zoo: Zoo, tmp_path, capsys) -> None:
    """A config whose base is a hostile pickle: refused (or weights-only with --trust-pickle), never executed."""
    for trust in ([], ["--trust-pickle"]):
        text = f"base: {zoo.root / 'evil_hf'}\nfamily: text\n" + GOOD_TASKS
        result = run_cli(["evaluate", "--config", _config(tmp_path, text), "--output", tmp_path / "r", *trust],
                         capsys)
        text_out = result.out + result.err
        assert "Traceback" not in text_out
        assert result.code == 2
        assert [line for line in result.err.splitlines() if line.startswith("error: ")]
        assert not zoo.marker.exists()
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content", [b"base: caf\xe9\n", b"x: " + b"[" * 5000 + b"]" * 5000 + b"\n"],
                         ids=["non_utf8", "nested"])
def test_library_config_reader_fails_in_one_line(tmp_path, content) -> None:
    """load_benchmark_config itself (not only the CLI) turns bad bytes and deep nesting into one line."""
    from massmerge.experiments.evaluate_config import load_benchmark_config
    from massmerge.errors import OptionError

    path = tmp_path / "bench.yaml"
    path.write_bytes(content)
    with pytest.raises(OptionError, match="bench.yaml") as info:
        load_benchmark_config(path)
    assert "\n" not in str(info.value)
