"""``massmerge build`` and ``predict`` on broken experts, heads, options and hand-edited artifacts.

A tiny random BERT (HF directory with a tokenizer) is the base; experts are safetensors state dicts of it.
Build and predict load transformers, which prints its own progress bars on stderr, so for these commands the
check is: exactly one ``error:`` line, last, naming the culprit; exit 2; no traceback; nothing written.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from robust_helpers import Payload, assert_cli_error, build_args, leftovers, run_cli, tree_digest

pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)


BAD_BUILD = [
    ({"experts": ("e1", "missing_key")}, ["missing_key", "encoder.layer.0.output.dense.weight"]),
    ({"experts": ("e1", "bad_shape")}, ["bad_shape", "encoder.layer.1.attention.self.query.weight"]),
    ({"experts": ("e1", "nan")}, ["nan", "encoder.layer.2.intermediate.dense.weight"]),
    ({"experts": ("e1", "empty")}, ["empty"]),
    ({"experts": ("e1", "truncated")}, ["truncated"]),
    ({"experts": ("e1", "evil")}, ["evil.pt"]),
    ({"experts": ("e1", "evil"), "extra": ("--trust-pickle",)}, ["evil.pt"]),
    ({"experts": ("e1", "not_a_model")}, ["not_a_model"]),
    ({"experts": ("e1", "nowhere.safetensors")}, ["nowhere"]),
    ({"experts": ("e1",), "heads": ("h1",)}, ["--experts"]),
    ({"heads": ("h1",)}, ["--heads"]),
    ({"heads": ("h1", "h_nodim")}, ["h_nodim", "weight"]),
    ({"heads": ("h1", "h_noscale")}, ["h_noscale", "logit_scale"]),
    ({"heads": ("h1", "h_badkind")}, ["h_badkind", "magic"]),
    ({"heads": ("h1", "h_evil")}, ["h_evil"]),
    ({"heads": ("h1", "nowhere.safetensors")}, ["nowhere"]),
    ({"extra": ("--routing-layer", "encoder.layer.99.nope")}, ["encoder.layer.99.nope"]),
    ({"extra": ("--routing-layer", "encoder.layer.0.attention")}, ["encoder.layer.0.attention"]),
    ({"extra": ("--rank-fraction", "0")}, ["--rank-fraction"]),
    ({"extra": ("--rank-fraction", "1.5")}, ["--rank-fraction"]),
    ({"extra": ("--eta", "1.5")}, ["--eta"]),
    ({"extra": ("--eta", "-0.1")}, ["--eta"]),
    ({"extra": ("--top-k", "0")}, ["--top-k"]),
    ({"extra": ("--tau", "0")}, ["--tau"]),
    ({"extra": ("--eps", "2")}, ["--eps"]),
    ({"extra": ("--mode", "everything")}, ["--mode"]),
    ({"extra": ("--factor-dtype", "int3")}, ["--factor-dtype"]),
    ({"extra": ("--task-names", "a", "a")}, ["--task-names"]),
]


@pytest.mark.parametrize(("kwargs", "culprits"), BAD_BUILD, ids=[str(i) for i in range(len(BAD_BUILD))])
def test_build_refuses(text_zoo, tmp_path, capsys, kwargs, culprits) -> None:
    out = tmp_path / "art"
    result = run_cli(build_args(text_zoo, out, **kwargs), capsys)
    assert_cli_error(result, *culprits)
    assert leftovers(tmp_path) == []
    assert not text_zoo["marker"].exists()


def test_build_handles_half_precision_expert(text_zoo, tmp_path, capsys) -> None:
    """Mixed precision (fp32 base, fp16 expert) is handled by the adapter: the expert is read in the base dtype."""
    out = tmp_path / "art"
    result = run_cli(build_args(text_zoo, out, experts=("e1", "fp16")), capsys)
    assert result.code == 0, result.err
    assert (out / "manifest.json").is_file()


def test_build_failure_keeps_previous_artifact(text_zoo, artifact, tmp_path, capsys) -> None:
    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    before = tree_digest(out)
    result = run_cli(build_args(text_zoo, out, experts=("e1", "nan")), capsys)
    assert_cli_error(result, "nan")
    assert tree_digest(out) == before
    assert leftovers(tmp_path, keep=[out]) == []


def test_build_disk_full_keeps_previous_artifact(text_zoo, artifact, tmp_path, capsys, monkeypatch) -> None:
    import errno
    import os

    import massmerge.io.tensors as artifact_module

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    before = tree_digest(out)
    monkeypatch.setattr(artifact_module, "save_file", full)
    result = run_cli(build_args(text_zoo, out), capsys)
    assert_cli_error(result, "No space left on device")
    assert tree_digest(out) == before
    assert leftovers(tmp_path, keep=[out]) == []


def test_build_refuses_to_replace_a_non_artifact(text_zoo, tmp_path, capsys) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not delete")
    assert_cli_error(run_cli(build_args(text_zoo, out), capsys), "--output")
    assert (out / "thesis.txt").read_text() == "do not delete"


# ----- predict on a valid artifact, then on hand-edited ones ----------------------------------------------

def test_predict_works_and_is_deterministic(artifact, text_zoo, tmp_path, capsys) -> None:
    outs = []
    for run in range(2):
        out = tmp_path / f"p{run}.jsonl"
        result = run_cli(["predict", artifact, text_zoo["inputs"], "--output", out], capsys)
        assert result.code == 0, result.err
        outs.append(out.read_bytes())
    lines = outs[0].decode().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["task"] in ("t1", "t2") for line in lines)
    assert outs[0] == outs[1]


def _edited(artifact: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(artifact, copy)
    manifest = copy / "manifest.json"
    data = json.loads(manifest.read_text())
    result = edit(data, copy)
    if result is not None:
        manifest.write_text(result if isinstance(result, str) else json.dumps(result))
    return copy


def _set(path: tuple, value):
    def edit(data, _copy):
        target = data
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
        return data
    return edit


def _tamper(path: Path) -> None:
    """Flip the last bytes of a file (same size): only the checksum can tell."""
    data = path.read_bytes()
    path.write_bytes(data[:-10] + bytes(255 - b for b in data[-10:]))


def _first_file(data) -> str:
    return min(data["files"])


MANIFEST_EDITS = [
    ("not_json", lambda d, c: "{ this is not json", ["manifest.json", "JSON"]),
    ("empty", lambda d, c: "", ["manifest.json"]),
    ("version", _set(("format_version",), 99), ["manifest.json", "format_version"]),
    ("extra_field", _set(("surprise",), 1), ["manifest.json", "surprise"]),
    ("eta", _set(("serve", "eta"), 7.0), ["manifest.json", "serve.eta"]),
    ("top_k", _set(("serve", "top_k"), 0), ["manifest.json", "serve.top_k"]),
    ("routing_layer", _set(("serve", "routing_layers"), ["encoder.nope"]), ["manifest.json", "encoder.nope"]),
    ("task_names", lambda d, c: {**d, "task_names": d["task_names"][:1]}, []),
    ("hash", lambda d, c: {**d, "files": {k: {**v, "sha256": "0" * 64} for k, v in d["files"].items()}}, []),
    ("file_missing", lambda d, c: (c / _first_file(d)).unlink(), []),
    ("file_tampered", lambda d, c: _tamper(c / "factors.safetensors"), ["factors.safetensors"]),
    ("manifest_gone", lambda d, c: (c / "manifest.json").unlink(), ["manifest.json"]),
]


@pytest.mark.parametrize(("name", "edit", "culprits"), MANIFEST_EDITS, ids=[e[0] for e in MANIFEST_EDITS])
def test_predict_refuses_hand_edited_artifact(artifact, text_zoo, tmp_path, capsys, name, edit, culprits) -> None:
    edited = _edited(artifact, tmp_path, edit)
    out = tmp_path / "preds.jsonl"
    out.write_text("previous\n")
    result = run_cli(["predict", edited, text_zoo["inputs"], "--output", out], capsys)
    assert_cli_error(result, *culprits)
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited", "preds.jsonl"]


def test_python_load_refuses_hand_edited_manifest(artifact, tmp_path) -> None:
    from massmerge.artifact import load
    from massmerge.errors import MassMergeError

    edited = _edited(artifact, tmp_path, _set(("serve", "tau"), -1))
    with pytest.raises(MassMergeError, match="tau"):
        load(edited)


@pytest.mark.parametrize(("setup", "culprits"), [
    (lambda z, t: ["predict", t / "nowhere", z["inputs"]], ["nowhere"]),
    (lambda z, t: ["predict", z["base"], z["inputs"]], ["manifest.json"]),
    (lambda z, t: ["predict", "ART", t / "absent.txt"], ["absent.txt"]),
    (lambda z, t: ["predict", "ART", _write(t / "bad.jsonl", '{"text": "w1"}\nnot json\n')], ["bad.jsonl", "line 2"]),
    (lambda z, t: ["predict", "ART", _write(t / "bad2.jsonl", '{"txt": "w1"}\n')], ["bad2.jsonl", "line 1"]),
    (lambda z, t: ["predict", "ART", z["inputs"], "--batch-size", "0"], ["--batch-size"]),
])
def test_predict_bad_inputs(artifact, text_zoo, tmp_path, capsys, setup, culprits) -> None:
    args = [artifact if a == "ART" else a for a in setup(text_zoo, tmp_path)]
    out = tmp_path / "preds.jsonl"
    result = run_cli([*args, "--output", out], capsys)
    assert_cli_error(result, *culprits)
    assert not out.exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_predict_output_disk_full_keeps_previous(artifact, text_zoo, tmp_path, capsys, monkeypatch) -> None:
    import errno
    import os

    out = tmp_path / "preds.jsonl"
    out.write_text("previous\n")
    real_open = Path.open

    class Full:
        """A file that takes a few bytes, then reports the disk full."""

        def __init__(self, handle) -> None:
            self.handle = handle

        def write(self, text: str) -> int:
            self.handle.write(text[:4])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.handle.name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

    def full(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        return Full(handle) if self.name.startswith(".preds.jsonl") and "w" in mode else handle

    monkeypatch.setattr(Path, "open", full)
    result = run_cli(["predict", artifact, text_zoo["inputs"], "--output", out], capsys)
    assert_cli_error(result, "No space left on device")
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl"]


# ----- hostile HF directories as the base ------------------------------------------------------------------

def _hostile_dir(text_zoo, tmp_path: Path, kind: str) -> Path:
    hostile = tmp_path / f"hostile_{kind}"
    hostile.mkdir()
    base = text_zoo["base"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (base / name).exists():
            shutil.copy(base / name, hostile / name)
    marker = text_zoo["marker"]
    if kind == "pickle":
        torch.save({"embeddings.word_embeddings.weight": Payload(marker)}, str(hostile / "pytorch_model.bin"))
    else:  # remote code: config.json asks for a modelling file that would create the marker on import
        shutil.copy(base / "model.safetensors", hostile / "model.safetensors")
        config = json.loads((hostile / "config.json").read_text())
        config["auto_map"] = {"AutoConfig": "evil_code.EvilConfig", "AutoModel": "evil_code.EvilModel"}
        (hostile / "config.json").write_text(json.dumps(config))
        (hostile / "evil_code.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                              "from transformers import BertConfig as EvilConfig\n"
                                              "from transformers import BertModel as EvilModel\n")
    return hostile


@pytest.mark.parametrize("trust", [False, True])
def test_build_pickle_only_base_never_runs_payload(text_zoo, tmp_path, capsys, trust) -> None:
    hostile = _hostile_dir(text_zoo, tmp_path, "pickle")
    args = build_args(text_zoo, tmp_path / "art", extra=("--trust-pickle",) if trust else ())
    args[args.index("--base") + 1] = hostile
    result = run_cli(args, capsys)
    line = assert_cli_error(result)
    assert "pytorch_model.bin" in line or str(hostile) in line
    assert not text_zoo["marker"].exists()
    assert not (tmp_path / "art").exists()


def test_build_remote_code_base_never_runs_code(text_zoo, tmp_path, capsys) -> None:
    """A config.json with auto_map must not import the directory's Python file (no trust_remote_code)."""
    hostile = _hostile_dir(text_zoo, tmp_path, "remote")
    args = build_args(text_zoo, tmp_path / "art")
    args[args.index("--base") + 1] = hostile
    result = run_cli(args, capsys)
    assert not text_zoo["marker"].exists()
    assert "Traceback" not in result.out + result.err
    if result.code != 0:  # refusing is fine; it must be a clean one-line error
        assert_cli_error(result)
