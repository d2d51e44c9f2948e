"""``massmerge merge`` and ``massmerge info`` end to end, through the installed entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from massmerge import merging
from massmerge.cli import expand_multi_value_options, main

CLI = [sys.executable, "-c", "from massmerge.cli import main; main()"]


def run(*args: str) -> subprocess.CompletedProcess:
    """The real entry point in a fresh interpreter (slow: imports torch; used for a few end-to-end checks)."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def run_in_process(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """``main`` in this process, with the same exit-code and stderr contract as the script."""
    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.fixture
def checkpoints(tmp_path: Path) -> tuple[Path, list[Path]]:
    torch.manual_seed(0)
    base = {"enc.weight": torch.randn(16, 12), "enc.bias": torch.randn(16), "step": torch.tensor([3])}
    save_file(base, str(tmp_path / "base.safetensors"))
    experts = []
    for t in range(3):
        state = {k: (v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v) for k, v in base.items()}
        path = tmp_path / f"expert{t}.safetensors"
        save_file(state, str(path))
        experts.append(path)
    return tmp_path / "base.safetensors", experts


@pytest.mark.parametrize("method,flags,opts", [
    ("tsv_m", ["--rank-fraction", "0.25"], {"rank_fraction": 0.25}),
    ("ties", ["--ties-density", "0.3", "--alpha", "0.8"], {"density": 0.3, "alpha": 0.8}),
    ("iso_cts", ["--common-fraction", "0.5"], {"common_fraction": 0.5}),
    ("task_arithmetic", [], {}),
    ("weight_average", [], {}),
    ("iso_c", ["--alpha", "1.2"], {"alpha": 1.2}),
])
def test_merge_writes_what_the_library_computes(tmp_path, checkpoints, capsys, method, flags, opts):
    base, experts = checkpoints
    out = tmp_path / "merged.safetensors"
    result = run_in_process(capsys, "merge", "--method", method, "--base", str(base), "--experts", *map(str, experts),
                 "--output", str(out), *flags)
    assert result.returncode == 0, result.stderr
    merged = load_file(str(out))
    base_state = load_file(str(base))
    tvs = [{k: load_file(str(e))[k] - base_state[k] for k in ("enc.weight", "enc.bias")} for e in experts]
    expected = merging.merge(method, base_state, tvs, **opts)
    assert list(merged) == list(base_state) or set(merged) == set(base_state)
    for key in base_state:
        assert merged[key].dtype == base_state[key].dtype and merged[key].shape == base_state[key].shape
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-6, atol=1e-6)


def test_exclude_leaves_keys_at_the_base(tmp_path, checkpoints, capsys):
    base, experts = checkpoints
    out = tmp_path / "m.safetensors"
    result = run_in_process(capsys, "merge", "--method", "tsv_m", "--base", str(base), "--experts", *map(str, experts),
                 "--exclude", "*.bias", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert torch.equal(load_file(str(out))["enc.bias"], load_file(str(base))["enc.bias"])


def test_info_lists_keys_shapes_dtypes(checkpoints):
    base, _ = checkpoints
    result = run("info", str(base))
    assert result.returncode == 0
    for text in ("enc.weight", "[16, 12]", "F32", "I64", "3 tensors"):
        assert text in result.stdout


@pytest.mark.parametrize("extra,needle", [
    (["--method", "nope"], "--method 'nope'"),
    (["--method", "ties", "--rank-fraction", "0.5"], "--rank-fraction does not apply"),
    (["--method", "tsv_m", "--rank-fraction", "2"], "--rank-fraction"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, checkpoints, capsys, extra, needle):
    base, experts = checkpoints
    out = tmp_path / "m.safetensors"
    result = run_in_process(capsys, "merge", "--base", str(base), "--experts", *map(str, experts), "--output", str(out), *extra)
    assert result.returncode == 2
    assert needle in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not out.exists()


def test_expand_multi_value_options():
    argv = ["merge", "--experts", "a", "b", "--alpha", "1", "--experts=c", "--base", "x"]
    assert expand_multi_value_options(argv) == [
        "merge", "--experts", "a", "--experts", "b", "--alpha", "1", "--experts=c", "--base", "x"]


def test_script_end_to_end_and_error_contract(tmp_path, checkpoints):
    """The installed entry point in a fresh process: a merge, then a bad expert (exit 2, one line, no file)."""
    base, experts = checkpoints
    out = tmp_path / "m.safetensors"
    ok = run("merge", "--method", "tsv_m", "--base", str(base), "--experts", *map(str, experts), "--output", str(out))
    assert ok.returncode == 0, ok.stderr
    assert out.is_file()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    bad_out = tmp_path / "bad.safetensors"
    bad = run("merge", "--method", "tsv_m", "--base", str(base), "--experts", str(experts[0]), str(broken),
              "--output", str(bad_out))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: ") and str(broken) in bad.stderr and bad.stderr.count("\n") == 1
    assert not bad_out.exists()
