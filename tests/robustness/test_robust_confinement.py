"""The artifact is a trust boundary: every file ``load`` reads is a listed, checksummed plain file inside it.

Real files throughout: manifest entries that climb out (``../../etc/passwd``, absolute paths), symlinks that
leave the directory (the factors file, a tokenizer file, the whole ``model/``), files the manifest does not
list, FIFOs, pickles and Python files beside the model, and a base "referenced" from anywhere. Where it matters
the syscalls are traced (strace): nothing outside the artifact is opened, and a symlink's target never is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from robust_helpers import (
    assert_cli_error,
    copy_artifact,
    digest,
    edit_manifest,
    load_error,
    read_manifest_json,
    rehash,
    run_cli,
)

pytest.importorskip("transformers")


def _entry(path: Path) -> dict:
    """A correct manifest entry for ``path`` (a hostile manifest would get this right)."""
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}


@pytest.fixture
def outside(tmp_path) -> Path:
    """A private file outside every artifact: if anything reads it, a test can tell."""
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text("root:x:0:0:secret\n")
    return path


# ----- names in the manifest ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "model/../../outside/secret.txt",
                                  "./factors.safetensors", "model//config.json", "model/", "..\\factors"])
def test_manifest_names_outside_the_artifact_refused(artifact, tmp_path, capsys, name) -> None:
    art = copy_artifact(artifact, tmp_path / "art")
    target = Path("/etc/passwd") if "passwd" in name else art / "factors.safetensors"
    edit_manifest(art, lambda m: m["files"].update({name: _entry(target)}))
    message = load_error(art)
    assert "manifest.json" in message and "'files'" in message and name in message
    result = run_cli(["predict", art, tmp_path / "none.txt"], capsys)  # refused before the inputs are read
    assert_cli_error(result, "manifest.json", name)


@pytest.mark.parametrize("name", ["model/modeling_evil.py", "model/pytorch_model.bin", "model/extra.safetensors",
                                  "notes.txt", "model/sub/tokenizer.json", "manifest.json"])
def test_listed_files_an_artifact_may_not_hold_refused(artifact, tmp_path, name) -> None:
    """Even listed with the right checksum: transformers would pick up a pickle or .py file in model/ itself."""
    art = copy_artifact(artifact, tmp_path / "art")
    (art / name).parent.mkdir(parents=True, exist_ok=True)
    if name != "manifest.json":
        (art / name).write_text("import os\n")
    edit_manifest(art, lambda m: m["files"].update({name: _entry(art / "model" / "config.json")}))
    rehash(art)
    message = load_error(art)
    assert "'files'" in message and name in message


# ----- what lies in the directory -------------------------------------------------------------------------------

def test_deleted_manifest_entry_of_a_present_file_refused(artifact, tmp_path) -> None:
    art = copy_artifact(artifact, tmp_path / "art")
    edit_manifest(art, lambda m: m["files"].pop("factors.safetensors"))
    message = load_error(art)
    assert "factors.safetensors" in message and "not listed" in message


def test_unlisted_file_beside_the_model_refused(artifact, tmp_path) -> None:
    art = copy_artifact(artifact, tmp_path / "art")
    (art / "model" / "modeling_bert.py").write_text("raise SystemExit('ran')\n")
    message = load_error(art)
    assert "modeling_bert.py" in message and "not listed" in message


def test_fifo_and_unlisted_directory_refused(artifact, tmp_path) -> None:
    art = copy_artifact(artifact, tmp_path / "art")
    os.mkfifo(art / "model" / "tokenizer.fifo")
    assert "FIFO" in load_error(art)  # and load did not hang opening it
    (art / "model" / "tokenizer.fifo").unlink()
    (art / "stray").mkdir()
    message = load_error(art)
    assert "stray" in message and "directory" in message


@pytest.mark.parametrize("which", ["factors.safetensors", "model/tokenizer.json", "model"])
def test_symlink_leaving_the_artifact_refused(artifact, tmp_path, capsys, which) -> None:
    """The target holds the very same bytes (so the checksum matches): only the symlink check can refuse."""
    art = copy_artifact(artifact, tmp_path / "art")
    target = tmp_path / "elsewhere" / Path(which).name
    target.parent.mkdir()
    shutil.move(str(art / which), str(target))
    os.symlink(target, art / which)
    message = load_error(art)
    assert which in message and "symlink" in message
    out = tmp_path / "preds.jsonl"
    result = run_cli(["predict", art, _inputs(tmp_path), "--output", out], capsys)
    assert_cli_error(result, which, "symlink")
    assert not out.exists()


def test_manifest_symlink_refused(artifact, tmp_path, outside) -> None:
    art = copy_artifact(artifact, tmp_path / "art")
    shutil.move(str(art / "manifest.json"), str(outside.parent / "manifest.json"))
    os.symlink(outside.parent / "manifest.json", art / "manifest.json")
    assert "manifest.json" in load_error(art)


# ----- an outside base ------------------------------------------------------------------------------------------

def test_adapter_artifact_cannot_reference_an_outside_base(artifact, tmp_path, text_zoo) -> None:
    art = copy_artifact(artifact, tmp_path / "art")
    weights = text_zoo["base"] / "model.safetensors"
    edit_manifest(art, lambda m: m.update(base={"mode": "reference", "dtype": "float32", "path": str(weights),
                                                **_entry(weights)}))
    message = load_error(art)
    assert "manifest.json" in message and "base.mode" in message


def test_embedded_base_must_be_the_model_weights(artifact, tmp_path) -> None:
    """base.file naming another listed file would feed e.g. the factors to the model as its weights."""
    art = copy_artifact(artifact, tmp_path / "art")
    edit_manifest(art, lambda m: m["base"].update(file="heads.safetensors"))
    assert "base.file" in load_error(art)


def test_generic_reference_must_be_absolute(tmp_path) -> None:
    from toy_mass import ToyEncoder, make_parts  # the generic-module toy of tests/ (tests/toy_mass.py)

    from massmerge.artifact import load, save_artifact
    from massmerge.checkpoints import save_state_dict
    from massmerge.errors import MassMergeError
    from massmerge.mass import MASSModel, mean_pool

    base, factors, heads, settings = make_parts(2, 0)
    model = MASSModel(base, factors, heads, settings, pool=mean_pool())
    save_state_dict(model.model.state_dict(), tmp_path / "base.safetensors")
    save_artifact(model, tmp_path / "art", base_reference=tmp_path / "base.safetensors")
    edit_manifest(tmp_path / "art", lambda m: m["base"].update(path="base.safetensors"))
    with pytest.raises(MassMergeError, match="absolute path"):
        load(tmp_path / "art", base_model=ToyEncoder())


# ----- traced: nothing outside the artifact is opened, a symlink's target never is ----------------------------

STRACE = shutil.which("strace")

LOADER = """
import sys
from massmerge.artifact import load
from massmerge.errors import MassMergeError
load(sys.argv[1])                      # warm-up: every lazy import (transformers, adapters) happens here
open(sys.argv[3], "w").close()         # marker: what follows is the load under test
try:
    load(sys.argv[2])
    print("LOADED")
except MassMergeError as exc:
    print("REFUSED", exc)
"""


def _traced_load(warm: Path, target: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """Run ``load(target)`` after a warm-up load under strace; (stdout, paths opened after the marker)."""
    if STRACE is None:
        pytest.skip("strace is not installed")
    marker, trace = tmp_path / "MARKER", tmp_path / "trace.txt"
    cmd = [STRACE, "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(trace), sys.executable, "-c", LOADER,
           str(warm), str(target), str(marker)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if "PTRACE" in proc.stderr or "Operation not permitted" in proc.stderr:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = trace.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if str(marker) in line)
    opened = [line.split('"')[1] for line in lines[start + 1:] if '"' in line and "ENOENT" not in line]
    return proc.stdout, opened


def _outside_paths(opened: list[str], artifact_dir: Path) -> list[str]:
    """Opened paths that are neither in the artifact nor the interpreter's own (/proc, /sys, /dev)."""
    inside = str(artifact_dir.resolve())
    system = ("/proc/", "/sys/", "/dev/")
    return [p for p in opened if not p.startswith(inside) and not p.startswith(system) and p != "/proc"]


def test_load_opens_only_files_inside_the_artifact(artifact, tmp_path) -> None:
    warm = copy_artifact(artifact, tmp_path / "warm")
    target = copy_artifact(artifact, tmp_path / "target")
    out, opened = _traced_load(warm, target, tmp_path)
    assert "LOADED" in out
    assert any(p.endswith("factors.safetensors") for p in opened)  # the trace does see the artifact's reads
    assert _outside_paths(opened, target) == []


def test_tokenizer_symlink_target_is_never_opened(artifact, tmp_path, outside) -> None:
    warm = copy_artifact(artifact, tmp_path / "warm")
    target = copy_artifact(artifact, tmp_path / "target")
    link = target / "model" / "tokenizer.json"
    link.unlink()
    os.symlink(outside, link)
    out, opened = _traced_load(warm, target, tmp_path)
    assert "REFUSED" in out and "symlink" in out
    assert str(outside) not in opened and str(link) not in opened
    assert _outside_paths(opened, target) == []


def test_traversal_entry_is_never_opened(artifact, tmp_path, outside) -> None:
    warm = copy_artifact(artifact, tmp_path / "warm")
    target = copy_artifact(artifact, tmp_path / "target")
    name = os.path.relpath(outside, target)
    edit_manifest(target, lambda m: m["files"].update({name: _entry(outside)}))
    out, opened = _traced_load(warm, target, tmp_path)
    assert "REFUSED" in out and name in out
    assert not any(p.endswith("secret.txt") for p in opened)
    assert _outside_paths(opened, target) == []


def test_predict_never_reads_a_symlinked_tokenizer(artifact, tmp_path, outside) -> None:
    """The whole command, traced: the error comes from the confinement check, not from parsing the target."""
    if STRACE is None:
        pytest.skip("strace is not installed")
    art = copy_artifact(artifact, tmp_path / "art")
    (art / "model" / "tokenizer.json").unlink()
    os.symlink(outside, art / "model" / "tokenizer.json")
    trace = tmp_path / "trace.txt"
    cmd = [STRACE, "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(trace), sys.executable, "-c",
           "from massmerge.cli import main; main()", "predict", str(art), str(_inputs(tmp_path))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if "PTRACE" in proc.stderr:
        pytest.skip("strace cannot trace here")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()][-1].startswith("error: ")
    text = trace.read_text()
    assert str(outside) not in text and f'"{art / "model" / "tokenizer.json"}"' not in text
    assert digest(outside) == hashlib.sha256(b"root:x:0:0:secret\n").hexdigest()


def _inputs(tmp_path: Path) -> Path:
    path = tmp_path / "inputs.txt"
    path.write_text("w1 w2 w3\nw4 w5\n")
    return path


def test_read_manifest_lists_files_as_written(artifact) -> None:
    """The names build writes are exactly the names load accepts (one closed list for both)."""
    from massmerge.artifact.manifest import allowed_name

    names = list(read_manifest_json(artifact)["files"])
    assert names and all(allowed_name(n) for n in names)
    assert {"factors.safetensors", "heads.safetensors", "model/config.json", "model/model.safetensors"} <= set(names)
