"""Same inputs and seed -> bit-identical merged tensors, output files and predictions, across runs and processes.

The cross-process tests use different PYTHONHASHSEED values so any dependence on set/dict-of-str ordering
would show up as different bytes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from massmerge import merging
from massmerge.checkpoints import load_state_dict, open_checkpoint, save_state_dict
from massmerge.heads import LinearHead
from massmerge.lowrank import truncated_svd
from massmerge.mass import ExpertFactors, MASSModel, make_serve_settings
from massmerge.task_vectors import CheckedTaskVector


def _state(seed: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if base is None:
        return {"enc.weight": torch.randn(24, 16, generator=g), "enc.bias": torch.randn(24, generator=g),
                "out.weight": torch.randn(10, 24, generator=g), "out.bias": torch.randn(10, generator=g),
                "count": torch.tensor([7])}
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in base.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("det")
    base = _state(0)
    paths = {"base": root / "base.safetensors"}
    save_file(base, str(paths["base"]))
    for i in (1, 2, 3):
        paths[f"e{i}"] = root / f"e{i}.safetensors"
        save_file(_state(i, base), str(paths[f"e{i}"]))
    return paths


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _opts(method: str) -> dict:
    return {"task": 1} if method == "tsv_c" else {}


@pytest.mark.parametrize("method", sorted(merging.MERGE_METHODS))
def test_in_process_merge_is_bit_identical(files, tmp_path, method) -> None:
    outputs = []
    for run in range(2):
        base = load_state_dict(files["base"])
        tvs = [CheckedTaskVector(base, open_checkpoint(files[f"e{i}"])) for i in (1, 2, 3)]
        merged = merging.merge(method, base, tvs, **_opts(method))
        path = tmp_path / f"run{run}.safetensors"
        save_state_dict(merged, path, metadata={"method": method})
        outputs.append((merged, path))
    (first, p1), (second, p2) = outputs
    assert list(first) == list(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert _digest(p1) == _digest(p2)


def _cli(args: list, hash_seed: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run([sys.executable, "-c", "from massmerge.cli import main; main()", *map(str, args)],
                          check=False, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("method", ["tsv_m", "ties", "iso_cts"])
def test_two_cli_runs_write_identical_bytes(files, tmp_path, method) -> None:
    digests = []
    for run, seed in enumerate(("1", "2")):
        out = tmp_path / f"m{run}.safetensors"
        proc = _cli(["merge", "--method", method, "--base", files["base"],
                     "--experts", files["e1"], files["e2"], files["e3"], "--output", out], seed)
        assert proc.returncode == 0, proc.stderr
        digests.append(_digest(out))
    assert digests[0] == digests[1]


def test_randomized_svd_is_deterministic_and_leaves_global_rng_alone() -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.randn(600, 520, generator=g)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = truncated_svd(a, 40, method="randomized")
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(999)  # a different global seed must not change the result
    second = truncated_svd(a, 40, method="randomized")
    for x, y in ((first.U, second.U), (first.s, second.s), (first.V, second.V)):
        assert torch.equal(x, y)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(16, 24)
        self.act = nn.Tanh()
        self.out = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.enc(x)))


def _mass_predictions(files: dict[str, Path], fast: bool = False) -> tuple[torch.Tensor, ...]:
    """Build a MASS model from the files from scratch and predict a fixed batch."""
    model = Net()
    base = load_state_dict(files["base"])
    model.load_state_dict(base, strict=False)
    model.eval()
    tvs = (CheckedTaskVector(base, open_checkpoint(files[f"e{i}"])) for i in (1, 2, 3))
    factors = ExpertFactors.build(tvs, ["a", "b", "c"])
    heads = [LinearHead(torch.randn(4 + t, 10, generator=torch.Generator().manual_seed(t))) for t in range(3)]
    config = make_serve_settings(routing_layers=("out",), eta=0.1)
    mass = MASSModel(model, factors, heads, config, strategy="auto" if fast else "grouped")
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(42))
    out = mass(x)
    return out.task, out.label, out.probs, out.selected, out.residuals["out"]


@pytest.mark.parametrize("fast", [False, True])
def test_mass_predictions_identical_across_fresh_builds(files, fast) -> None:
    first = _mass_predictions(files, fast)
    torch.manual_seed(31337)  # unrelated global RNG use in between must not matter
    torch.randn(100)
    second = _mass_predictions(files, fast)
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    assert len(set(first[0].tolist())) >= 1


def test_mass_predictions_identical_across_processes(files, tmp_path) -> None:
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_determinism import _mass_predictions
        from pathlib import Path
        files = {{k: Path(v) for k, v in { {k: str(v) for k, v in files.items()}!r}.items()}}
        task, label, probs, selected, res = _mass_predictions(files)
        torch.save({{"task": task, "label": label, "probs": probs, "selected": selected, "res": res}}, sys.argv[1])
    """)
    results = []
    for seed in ("3", "4"):
        out = tmp_path / f"pred{seed}.pt"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-c", script, str(out)], check=False, capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        results.append(torch.load(str(out), weights_only=True))
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key
