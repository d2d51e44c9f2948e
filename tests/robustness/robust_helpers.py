"""Helpers for the robustness suite: a tiny valid model zoo plus every kind of broken or hostile input.

Everything is small (a few hundred numbers per file) so the whole matrix runs in seconds. The helpers run the
CLI in-process (fast, lets tests patch the writer) or in a real subprocess (proves no traceback reaches a user).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from collections.abc import Sequence
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
