"""Faults while writing: a disk that fills at any point, Ctrl-C, a SIGKILLed build, a reader that goes away.

Real faults where the machine allows them: a small tmpfs mounted for the test fills up during ``save_artifact``
(swept over sizes so it fails in each file), during a CLI ``build`` that replaces an older artifact, and under
``predict --output`` and ``predict > file``; SIGINT and SIGKILL go to real subprocesses paused at a known point.
Every failure is one line naming the output, exit 2 (130 for SIGINT), nothing half-written, the earlier output
intact. The patched variants (safetensors raising ``SafetensorError``, as it does for ENOSPC) run everywhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from robust_helpers import (
    assert_cli_error,
    build_args,
    copy_artifact,
    leftovers,
    run_cli,
    small_tmpfs,
    tree_bytes,
    tree_digest,
)
from safetensors import SafetensorError

pytest.importorskip("transformers")

ENOSPC_TEXT = "No space left on device"


@pytest.fixture(scope="module")
def served(artifact):
    """The artifact loaded back: a MASS model to save again, without factorizing anything."""
    from massmerge.artifact import load

    return load(artifact)


def _save(model, artifact: Path, out: Path) -> None:
    from massmerge.artifact import save_artifact

    names = [h.class_names for h in model.manifest.heads]
    save_artifact(model, out, adapter=model.adapter, tokenizer_dir=artifact / "model", factor_dtype=torch.float16,
                  class_names=names)


# ----- ENOSPC on a real tmpfs, at every point of the write --------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_save_artifact_on_a_full_tmpfs_fails_cleanly_at_any_point(served, artifact, tmp_path, fraction) -> None:
    from massmerge.errors import MassMergeError

    reference = tmp_path / "reference"
    _save(served, artifact, reference)
    need = tree_bytes(reference)  # what a complete artifact takes, in tmpfs pages
    size = max(4096, int(need * fraction) // 4096 * 4096 - 4096)  # always at least one page short
    with small_tmpfs(tmp_path / "disk", size) as disk:
        with pytest.raises(MassMergeError) as info:
            _save(served, artifact, disk / "art")
        message = str(info.value)
        assert str(disk / "art") in message and ENOSPC_TEXT in message and "\n" not in message
        assert list(disk.iterdir()) == []  # no half-written artifact, no temp directory


def test_build_replacing_an_artifact_on_a_full_tmpfs_keeps_it(text_zoo, artifact, tmp_path, capsys) -> None:
    need = tree_bytes(artifact)
    with small_tmpfs(tmp_path / "disk", need + need // 2) as disk:  # the old one fits, a second one does not
        out = copy_artifact(artifact, disk / "art")
        before = tree_digest(out)
        line = assert_cli_error(run_cli(build_args(text_zoo, out), capsys), str(out), ENOSPC_TEXT)
        assert "Traceback" not in line
        assert tree_digest(out) == before
        assert leftovers(disk, keep=[out]) == []
        assert run_cli(["info", out], capsys).code == 0  # still a valid artifact


def _fill(disk: Path) -> None:
    """Take every free page of ``disk``."""
    with open(disk / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass


def test_predict_output_on_a_full_tmpfs_keeps_the_previous_file(artifact, text_zoo, tmp_path, capsys) -> None:
    with small_tmpfs(tmp_path / "disk", 64 * 1024) as disk:
        out = disk / "preds.jsonl"
        out.write_text("previous\n")
        _fill(disk)
        result = run_cli(["predict", artifact, text_zoo["inputs"], "--output", out], capsys)
        assert_cli_error(result, str(out), ENOSPC_TEXT)
        assert out.read_text() == "previous\n"
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "preds.jsonl"]


def test_predict_to_a_full_redirected_stdout_is_one_line(artifact, text_zoo, tmp_path) -> None:
    with small_tmpfs(tmp_path / "disk", 64 * 1024) as disk:
        _fill(disk)
        with open(disk / "out.jsonl", "w") as stdout:
            proc = subprocess.run([sys.executable, "-c", "from massmerge.cli import main; main()", "predict",
                                   str(artifact), str(text_zoo["inputs"])], stdout=stdout, stderr=subprocess.PIPE,
                                  text=True, timeout=600, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: stdout: cannot write the predictions ({ENOSPC_TEXT})"]


def test_predict_to_a_closed_pipe_exits_quietly(artifact, text_zoo, tmp_path) -> None:
    inputs = tmp_path / "many.txt"
    inputs.write_text("w1 w2 w3\n" * 64)
    cmd = [sys.executable, "-c", "from massmerge.cli import main; main()", "predict", str(artifact), str(inputs),
           "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().startswith("{")
    proc.stdout.close()  # the reader goes away, as `| head -1` does
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 141 and "Traceback" not in err and "error:" not in err, err


# ----- the patched variant: safetensors reports a full disk as SafetensorError ----------------------------------

@pytest.mark.parametrize("which", ["factors.safetensors", "model.safetensors"])
def test_safetensor_error_during_build_is_one_line(text_zoo, artifact, tmp_path, capsys, monkeypatch,
                                                   which) -> None:
    import massmerge.io.tensors as artifact_module

    real = artifact_module.save_file

    def full_disk(tensors, filename, metadata=None):
        if Path(filename).name != which:
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    out = copy_artifact(artifact, tmp_path / "art")
    before = tree_digest(out)
    monkeypatch.setattr(artifact_module, "save_file", full_disk)
    assert_cli_error(run_cli(build_args(text_zoo, out), capsys), str(out), ENOSPC_TEXT)
    assert tree_digest(out) == before
    assert leftovers(tmp_path, keep=[out]) == []


def test_safetensor_error_in_merge_names_the_output(zoo, tmp_path, capsys, monkeypatch) -> None:
    from massmerge import checkpoints

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    out = tmp_path / "merged.safetensors"
    monkeypatch.setattr(checkpoints, "save_file", full_disk)
    result = run_cli(["merge", "--method", "tsv_m", "--base", zoo.base, "--experts", zoo.e1, zoo.e2,
                      "--output", out], capsys)
    assert_cli_error(result, str(out), ENOSPC_TEXT)
    assert leftovers(tmp_path) == []


# ----- signals: a real subprocess paused at a known point ---------------------------------------------------------

PAUSING = """
import pathlib, sys, time
ready, point = pathlib.Path(sys.argv.pop(1)), sys.argv.pop(1)
import massmerge.artifact.build as build
import massmerge.artifact.save as save
import massmerge.artifact.predictor as serving

def pause():
    ready.write_text(str(__import__("os").getpid()))
    time.sleep(300)

if point == "factorizing":
    real_assemble = build.assemble
    def assemble(*args, **kwargs):
        pause()
        return real_assemble(*args, **kwargs)
    build.assemble = assemble
elif point == "writing":  # the temp directory holds a complete first file, the rest is still to come
    real_save = save.save_tensors
    def save_tensors(*args, **kwargs):
        real_save(*args, **kwargs)
        pause()
    save.save_tensors = save_tensors
elif point == "predicting":  # one row is written to the temp output, the next one is under way
    real_row, calls = serving.prediction_row, []
    def prediction_row(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            pause()
        return real_row(*args, **kwargs)
    serving.prediction_row = prediction_row
from massmerge.cli import main
main(sys.argv[1:])
"""


def _as_from_a_terminal() -> None:
    """SIGINT as a terminal user's command gets it (a test runner started in the background may ignore it,
    and an ignored SIGINT is inherited)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _paused(tmp_path: Path, point: str, args: list) -> subprocess.Popen:
    """Start ``massmerge ARGS`` in a subprocess and return once it sits at ``point``."""
    ready = tmp_path / f"ready-{point}"
    proc = subprocess.Popen([sys.executable, "-c", PAUSING, str(ready), point, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_from_a_terminal)
    deadline = time.monotonic() + 600
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the command never reached {point}:\n{err[-3000:]}")
        time.sleep(0.2)
    return proc


def _interrupted(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: interrupted"), err
    assert len([line for line in lines if line.startswith("error: ")]) == 1
    return lines[-1]


@pytest.mark.parametrize("point", ["factorizing", "writing"])
def test_sigint_during_build_leaves_nothing_behind(text_zoo, artifact, tmp_path, point) -> None:
    work = tmp_path / "work"
    out = copy_artifact(artifact, work / "art")  # an earlier artifact at the same path must survive
    before = tree_digest(out)
    proc = _paused(tmp_path, point, build_args(text_zoo, out))
    if point == "writing":
        assert any(p.name.endswith(".tmp") for p in work.iterdir())  # interrupted mid-write indeed
    _interrupted(proc)
    assert tree_digest(out) == before
    assert leftovers(work, keep=[out]) == []


def test_sigint_during_predict_leaves_no_output(artifact, tmp_path) -> None:
    inputs = tmp_path / "in.txt"
    inputs.write_text("w1 w2\nw3 w4\nw5\n")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "preds.jsonl"
    proc = _paused(tmp_path, "predicting", ["predict", artifact, inputs, "--output", out, "--batch-size", "1"])
    _interrupted(proc)
    assert list(work.iterdir()) == []


def test_sigkilled_build_temp_is_removed_by_the_next_build(text_zoo, tmp_path, capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out = work / "art"
    proc = _paused(tmp_path, "writing", build_args(text_zoo, out))
    proc.kill()
    proc.communicate(timeout=60)
    stale = [p for p in work.iterdir() if p.name.startswith(".art.") and p.name.endswith(".tmp")]
    assert len(stale) == 1 and f".art.{proc.pid}." in stale[0].name and any(stale[0].iterdir())
    assert run_cli(build_args(text_zoo, out), capsys).code == 0
    assert sorted(p.name for p in work.iterdir()) == ["art"]
    assert run_cli(["info", out], capsys).code == 0


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_of_dead_builds_only(tmp_path) -> None:
    """A live build's temp directory is left alone; a dead one's, or one without a pid (older massmerge), goes;
    a killed swap's ``.old`` artifact is put back when nothing took its place."""
    from massmerge.io.atomic import write_directory_atomically

    dead = _dead_pid()
    live = tmp_path / f".art.{os.getpid()}.live0000.tmp"
    gone = [tmp_path / f".art.{dead}.dead0000.tmp", tmp_path / ".art.legacy00.tmp"]
    other = tmp_path / f".art.x.{dead}.other000.tmp"  # a temp of output 'art.x', not of 'art'
    for path in [live, *gone, other]:
        path.mkdir()
    kept = tmp_path / f".art.{dead}.swap0000.old" / "artifact"
    kept.mkdir(parents=True)
    (kept / "manifest.json").write_text("{}")

    def fail(tmp: Path) -> None:
        raise RuntimeError("this build fails too")

    with pytest.raises(RuntimeError):
        write_directory_atomically(tmp_path / "art", fail)
    assert (tmp_path / "art" / "manifest.json").read_text() == "{}"  # the previous artifact is back
    assert live.exists() and other.exists()
    assert not any(path.exists() for path in gone)
    assert not kept.parent.exists()
    shutil.rmtree(live)
