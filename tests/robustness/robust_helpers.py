"""Helpers for the robustness suite: a tiny valid model zoo plus every kind of broken or hostile input.

Everything is small (a few hundred numbers per file) so the whole matrix runs in seconds. The helpers run the
CLI in-process (fast, lets tests patch the writer) or in a real subprocess (proves no traceback reaches a user).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from massmerge.cli import main


def make_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A small state dict: two matrices, a bias and an integer buffer (which merges must copy, not merge)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "l1.weight": torch.randn(8, 6, generator=g).to(dtype),
        "l1.bias": torch.randn(8, generator=g).to(dtype),
        "l2.weight": torch.randn(4, 8, generator=g).to(dtype),
        "steps": torch.tensor([3]),
    }


def expert_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The base plus a small random perturbation (a plausible fine-tuned expert)."""
    base = make_state(0, dtype)
    g = torch.Generator().manual_seed(1000 + seed)
    return {k: (v + 0.1 * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v.clone()
            for k, v in base.items()}


class Payload:
    """Unpickling this object calls ``open(marker, 'w')``: it would create the marker file (arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@dataclass
class Zoo:
    """Paths of the valid and broken inputs, all in one directory."""

    root: Path
    marker: Path

    def __getattr__(self, name: str) -> Path:  # zoo.base -> root / "base.safetensors"
        if name.startswith("_"):
            raise AttributeError(name)
        for suffix in (".safetensors", ".pt", ".bin", ".pkl", ""):
            path = self.root / f"{name}{suffix}"
            if path.exists():
                return path
        raise AttributeError(name)


def build_zoo(root: Path) -> Zoo:
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "PWNED"
    save_file(make_state(0), str(root / "base.safetensors"))
    for i in (1, 2, 3):
        save_file(expert_state(i), str(root / f"e{i}.safetensors"))
    # different key sets
    s = expert_state(4)
    s["extra.weight"] = torch.zeros(2, 2)
    save_file(s, str(root / "extra_key.safetensors"))
    s = expert_state(4)
    del s["l2.weight"]
    save_file(s, str(root / "missing_key.safetensors"))
    # different shape
    s = expert_state(4)
    s["l1.weight"] = torch.zeros(8, 5)
    save_file(s, str(root / "bad_shape.safetensors"))
    # dtypes: the same model in fp16 and bf16 (mixing them with an fp32 base must be refused clearly)
    save_file(expert_state(4, torch.float16), str(root / "fp16.safetensors"))
    save_file(expert_state(4, torch.bfloat16), str(root / "bf16.safetensors"))
    save_file(make_state(0, torch.bfloat16), str(root / "base_bf16.safetensors"))
    for i in (1, 2):
        save_file(expert_state(i, torch.bfloat16), str(root / f"e{i}_bf16.safetensors"))
    # NaN / Inf
    s = expert_state(4)
    s["l1.weight"][2, 3] = float("nan")
    save_file(s, str(root / "nan.safetensors"))
    s = expert_state(4)
    s["l1.bias"][0] = float("inf")
    save_file(s, str(root / "inf.safetensors"))
    # empty, truncated, garbage
    (root / "empty.safetensors").write_bytes(b"")
    data = (root / "e1.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "truncated_tail.safetensors").write_bytes(data[:-7])
    (root / "garbage.safetensors").write_bytes(os.urandom(64) + b"\xff" * 64)
    # a directory that is not an HF model
    notmodel = root / "not_a_model"
    notmodel.mkdir()
    (notmodel / "README.md").write_text("hello\n")
    (notmodel / "config.json").write_text("{}\n")
    # a malformed shard index
    badindex = root / "bad_index"
    badindex.mkdir()
    (badindex / "model.safetensors.index.json").write_text('{"weight_map": {"l1.weight": "nope.safetensors"}}')
    # hostile pickles: a torch.save'd dict holding the payload, a raw pickle, and a pickle named .safetensors
    torch.save({"l1.weight": torch.zeros(8, 6), "evil": Payload(marker)}, str(root / "evil.pt"))
    (root / "evil.bin").write_bytes(pickle.dumps({"evil": Payload(marker)}))
    (root / "evil.pkl").write_bytes(pickle.dumps(Payload(marker)))
    (root / "evil_named.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    hfdir = root / "evil_hf"
    hfdir.mkdir()
    (hfdir / "config.json").write_text("{}\n")
    torch.save({"evil": Payload(marker)}, str(hfdir / "pytorch_model.bin"))
    assert not marker.exists()
    return Zoo(root, marker)


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(args: Sequence[str | os.PathLike[str]], capsys: pytest.CaptureFixture[str]) -> Result:
    """Run ``massmerge ARGS`` in-process through the real entry point; returns exit code and captured output."""
    capsys.readouterr()
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def run_cli_subprocess(args: Sequence[str | os.PathLike[str]], *, cwd: Path | None = None,
                       timeout: float = 300) -> Result:
    """Run ``massmerge ARGS`` in a fresh interpreter, as a user would."""
    cmd = [sys.executable, "-c", "from massmerge.cli import main; main()", *map(str, args)]
    env = {**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_user_error(result: Result, *culprits: str) -> str:
    """Exit code 2, no traceback, and exactly one stderr line 'error: ...' that names every culprit."""
    text = result.out + result.err
    assert "Traceback" not in text, text
    assert result.code == 2, f"exit code {result.code}, output:\n{text}"
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{result.err}"
    line = lines[0]
    assert line.startswith("error: "), line
    for culprit in culprits:
        assert culprit in line, f"{culprit!r} not named in: {line}"
    return line


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(directory: Path, keep: Sequence[Path] = ()) -> list[Path]:
    """Files in ``directory`` other than ``keep`` (temp files of an aborted write would show up here)."""
    kept = {p.resolve() for p in keep}
    return sorted(p for p in directory.iterdir() if p.resolve() not in kept)


# ----- the text zoo: a tiny BERT base, experts, heads and a built artifact -------------------------------------

def assert_cli_error(result: Result, *culprits: str) -> str:
    """Exit 2, no traceback, exactly one 'error:' line (the last one) naming every culprit."""
    text = result.out + result.err
    assert "Traceback" not in text, text
    assert result.code == 2, f"exit code {result.code}:\n{text}"
    lines = [line for line in result.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.err
    for culprit in culprits:
        assert culprit in errors[0], f"{culprit!r} not named in: {errors[0]}"
    return errors[0]


def build_text_zoo(root: Path) -> dict[str, Path]:
    """A tiny random BERT (HF directory with a tokenizer, 32 positions), experts of it (valid and broken)
    and heads files; built once per session (conftest.py)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertModel(config).eval()
    base_dir = root / "base"
    model.save_pretrained(str(base_dir), safe_serialization=True)
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(str(base_dir))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    paths = {"base": base_dir, "marker": root / "PWNED"}

    def expert(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {k: (v + 0.02 * torch.randn(v.shape, generator=g)).contiguous() if v.is_floating_point() else v
                for k, v in state.items()}

    def save(name: str, tensors: dict) -> None:
        paths[name] = root / f"{name}.safetensors"
        save_file(tensors, str(paths[name]))

    save("e1", expert(1))
    save("e2", expert(2))
    save("e3", expert(3))
    s = expert(4)
    del s["encoder.layer.0.output.dense.weight"]
    save("missing_key", s)
    s = expert(4)
    s["encoder.layer.1.attention.self.query.weight"] = torch.zeros(32, 31)
    save("bad_shape", s)
    save("fp16", {k: v.half() if v.is_floating_point() else v for k, v in expert(4).items()})
    s = expert(4)
    s["encoder.layer.2.intermediate.dense.weight"][0, 0] = float("nan")
    save("nan", s)
    paths["empty"] = root / "empty.safetensors"
    paths["empty"].write_bytes(b"")
    data = paths["e1"].read_bytes()
    paths["truncated"] = root / "truncated.safetensors"
    paths["truncated"].write_bytes(data[: len(data) // 3])
    paths["evil"] = root / "evil.pt"
    torch.save({"x": Payload(paths["marker"])}, str(paths["evil"]))
    paths["not_a_model"] = root / "not_a_model"
    paths["not_a_model"].mkdir()
    (paths["not_a_model"] / "notes.txt").write_text("hi")
    for i in (1, 2, 3):
        paths[f"h{i}"] = root / f"h{i}.safetensors"
        save_file({"weight": torch.randn(3, 32, generator=torch.Generator().manual_seed(i))}, str(paths[f"h{i}"]),
                  metadata={"task": f"t{i}", "kind": "zero_shot", "logit_scale": "50.0"})
    paths["h_noscale"] = root / "h_noscale.safetensors"
    save_file({"weight": torch.randn(3, 32)}, str(paths["h_noscale"]), metadata={"kind": "zero_shot"})
    paths["h_nodim"] = root / "h_nodim.safetensors"
    save_file({"bias": torch.randn(3)}, str(paths["h_nodim"]))
    paths["h_badkind"] = root / "h_badkind.safetensors"
    save_file({"weight": torch.randn(3, 32)}, str(paths["h_badkind"]), metadata={"kind": "magic"})
    paths["h_evil"] = root / "h_evil.pt"
    torch.save({"weight": Payload(paths["marker"])}, str(paths["h_evil"]))
    paths["inputs"] = root / "inputs.txt"
    paths["inputs"].write_text("w1 w2 w3\nw4 w5\nw9 w10 w11 w12\nw60 w61\n")
    return paths


def build_args(z: dict, output: Path, experts=("e1", "e2"), heads=("h1", "h2"), extra=()) -> list:
    return ["build", "--base", z["base"], "--experts", *[z.get(e, e) for e in experts],
            "--heads", *[z.get(h, h) for h in heads], "--output", output, *extra]


def tree_digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` by relative path (an artifact left untouched compares equal)."""
    return {str(p.relative_to(directory)): digest(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def build_artifact_once(text_zoo: dict[str, Path], out: Path) -> Path:
    """``massmerge build`` of e1 + e2 with heads h1 + h2 (tasks t1, t2) into ``out``."""
    code = 0
    try:
        main([str(a) for a in build_args(text_zoo, out)])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    assert code == 0 and (out / "manifest.json").is_file()
    return out


# ----- hand-edited artifacts: edit a copy, then fix the checksums up as an attacker would -----------------------

def copy_artifact(artifact: Path, target: Path) -> Path:
    """A private copy of the session's artifact (tests never modify the shared one)."""
    shutil.copytree(artifact, target, symlinks=True)
    return target


def read_manifest_json(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def write_manifest_json(directory: Path, data: dict) -> None:
    (directory / "manifest.json").write_text(json.dumps(data, indent=1))


def edit_manifest(directory: Path, edit: Callable[[dict], object]) -> None:
    """Apply ``edit`` to the parsed manifest (in place) and write it back."""
    data = read_manifest_json(directory)
    edit(data)
    write_manifest_json(directory, data)


def edit_tensors(directory: Path, name: str, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """Rewrite one safetensors file of the artifact after ``edit`` changed its tensors (in place)."""
    from safetensors.torch import load_file

    tensors = load_file(str(directory / name))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / name))


def rehash(directory: Path) -> None:
    """Record every listed plain file's current size and sha256 in the manifest: the checksums match again, so
    only the structural checks can catch an edit."""
    data = read_manifest_json(directory)
    for name in data["files"]:
        path = directory / name
        if path.is_file() and not path.is_symlink():
            data["files"][name] = {"sha256": digest(path), "bytes": path.stat().st_size}
    write_manifest_json(directory, data)


def load_error(directory: Path) -> str:
    """The one-line MassMergeError that ``massmerge.artifact.load`` raises for ``directory``."""
    from massmerge.artifact import load
    from massmerge.errors import MassMergeError

    with pytest.raises(MassMergeError) as info:
        load(directory)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ----- a real small file system that fills up -------------------------------------------------------------------

@contextmanager
def small_tmpfs(mount_point: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size_bytes`` (rounded up to pages) at ``mount_point`` for the block; skips the test
    cleanly where mounting is not permitted (not root, no CAP_SYS_ADMIN)."""
    mount_point.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    size = max(4096, -(-size_bytes // 4096) * 4096)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                          check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)


def tree_bytes(directory: Path) -> int:
    """Bytes of the files under ``directory``, each rounded up to whole 4 KiB pages (as a tmpfs charges them)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in directory.rglob("*") if p.is_file())
