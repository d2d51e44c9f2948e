"""Inputs a stranger hands to ``predict`` and ``evaluate``: bad bytes, deep nesting, odd lengths, odd files.

Real files: non-UTF-8 bytes on a known line, a JSON line (and a manifest) nested 100 000 deep, non-UTF-8 and
deeply nested YAML, empty and all-blank inputs, a directory and a FIFO given as the inputs. Each is one line
naming the file (and the line), exit 2, no traceback, no output file; an empty input is a one-line note.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from robust_helpers import assert_cli_error, copy_artifact, run_cli

pytest.importorskip("transformers")

DEEP = "[" * 100_000 + "]" * 100_000


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _predict(artifact: Path, inputs: Path, tmp_path: Path, capsys, *extra: str):
    out = tmp_path / "preds.jsonl"
    return run_cli(["predict", artifact, inputs, "--output", out, *extra], capsys), out


@pytest.mark.parametrize(("name", "data", "culprits"), [
    ("latin1.txt", b"w1 w2\nw3 caf\xe9\n", ["latin1.txt", "line 2", "UTF-8"]),
    ("bad.jsonl", b'{"text": "w1"}\n"\xff\xfe"\n', ["bad.jsonl", "line 2", "UTF-8"]),
    ("deep.jsonl", '{"text": "w1"}\n' + DEEP + "\n", ["deep.jsonl", "line 2", "nested"]),
    ("notjson.jsonl", '{"text": "w1"}\n{"text": \n', ["notjson.jsonl", "line 2", "JSON"]),
    ("notext.jsonl", '{"txt": "w1"}\n', ["notext.jsonl", "line 1", "text"]),
    ("number.jsonl", "3\n", ["number.jsonl", "line 1"]),
])
def test_predict_refuses_bad_input_files(artifact, tmp_path, capsys, name, data, culprits) -> None:
    result, out = _predict(artifact, _write(tmp_path / name, data), tmp_path, capsys)
    assert_cli_error(result, *culprits)
    assert not out.exists()


def test_predict_names_a_directory_and_a_fifo(artifact, tmp_path, capsys) -> None:
    folder = tmp_path / "inputs_dir"
    folder.mkdir()
    result, out = _predict(artifact, folder, tmp_path, capsys)
    assert_cli_error(result, "inputs_dir", "is a directory")
    fifo = tmp_path / "inputs.fifo"
    os.mkfifo(fifo)
    result, out = _predict(artifact, fifo, tmp_path, capsys)  # must not block reading the pipe
    assert_cli_error(result, "inputs.fifo", "FIFO")
    result, out = _predict(artifact, tmp_path / "absent.txt", tmp_path, capsys)
    assert_cli_error(result, "absent.txt", "no such file")
    assert not out.exists()


@pytest.mark.parametrize("content", ["", "\n   \n\t\n\r\n"])
def test_predict_empty_input_is_a_one_line_note(artifact, tmp_path, capsys, content) -> None:
    result, out = _predict(artifact, _write(tmp_path / "empty.txt", content), tmp_path, capsys)
    assert result.code == 0, result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("note: ") and "empty.txt" in lines[0], result.err
    assert out.read_text() == ""  # an (empty) output file, so a pipeline sees the run happened


@pytest.mark.parametrize("value", ["0", "-3", "-1"])
def test_predict_refuses_max_length_below_one(artifact, text_zoo, tmp_path, capsys, value) -> None:
    result, out = _predict(artifact, text_zoo["inputs"], tmp_path, capsys, "--max-length", value)
    assert_cli_error(result, "--max-length", value)
    assert not out.exists()


LONG = " ".join(f"w{i}" for i in range(5, 90)) + "\n"  # 85 tokens for a 32-position model


def test_predict_clips_max_length_to_the_positions(artifact, tmp_path, capsys) -> None:
    inputs = _write(tmp_path / "long.txt", LONG * 2)
    result, out = _predict(artifact, inputs, tmp_path, capsys, "--max-length", "1000")
    assert result.code == 0, result.err
    notes = [line for line in result.err.splitlines() if line.startswith("note: ")]
    assert notes == ["note: --max-length 1000 is above the model's 32 positions; using 32"]
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [1, 2]


def test_predict_clips_a_manifest_max_length_naming_the_field(artifact, tmp_path, capsys) -> None:
    from robust_helpers import edit_manifest

    art = copy_artifact(artifact, tmp_path / "art")
    edit_manifest(art, lambda m: m["serve"].update(max_length=100_000))
    result, out = _predict(art, _write(tmp_path / "long.txt", LONG), tmp_path, capsys)
    assert result.code == 0, result.err
    note = next(line for line in result.err.splitlines() if line.startswith("note: "))
    assert "manifest.json" in note and "serve.max_length" in note and "--max-length" not in note
    assert len(out.read_text().splitlines()) == 1


def test_deeply_nested_manifest_refused(artifact, tmp_path, capsys) -> None:
    art = copy_artifact(artifact, tmp_path / "art")
    (art / "manifest.json").write_text(DEEP)
    result, _ = _predict(art, _write(tmp_path / "in.txt", "w1\n"), tmp_path, capsys)
    assert_cli_error(result, "manifest.json", "nested")
    assert_cli_error(run_cli(["info", art], capsys), "manifest.json", "nested")


@pytest.mark.parametrize("data", [b"\xff\xfe{}", b'{"format_version": 2, "x": "\xc3"}'])
def test_non_utf8_manifest_refused(artifact, tmp_path, capsys, data) -> None:
    art = copy_artifact(artifact, tmp_path / "art")
    (art / "manifest.json").write_bytes(data)
    result, _ = _predict(art, _write(tmp_path / "in.txt", "w1\n"), tmp_path, capsys)
    assert_cli_error(result, "manifest.json", "UTF-8")


@pytest.mark.parametrize(("data", "culprits"), [
    (b"base: /x\nname: caf\xe9\n", ["bench.yaml", "line 2", "UTF-8"]),
    (("a: " + "[" * 20_000 + "]" * 20_000 + "\n").encode(), ["bench.yaml", "nested"]),
    (b"", ["bench.yaml"]),
])
def test_evaluate_refuses_bad_yaml_bytes(tmp_path, capsys, data, culprits) -> None:
    pytest.importorskip("yaml")
    config = _write(tmp_path / "bench.yaml", data)
    out = tmp_path / "report"
    assert_cli_error(run_cli(["evaluate", "--config", config, "--output", out], capsys), *culprits)
    assert not out.exists()


def test_evaluate_names_a_directory_config(tmp_path, capsys) -> None:
    (tmp_path / "conf").mkdir()
    assert_cli_error(run_cli(["evaluate", "--config", tmp_path / "conf"], capsys), "conf", "directory")
