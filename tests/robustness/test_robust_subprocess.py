"""A few of the matrix's cases in a real subprocess: what a user's terminal shows (no traceback, exit 2)."""

from __future__ import annotations

import pytest
from robust_helpers import Zoo, assert_user_error, run_cli_subprocess


@pytest.mark.parametrize(("args", "culprits"), [
    (lambda z, t: ["merge", "--method", "tsv_m", "--base", z.base, "--experts", z.e1, z.nan,
                   "--output", t / "o.safetensors"], ["nan.safetensors", "NaN"]),
    (lambda z, t: ["merge", "--method", "tsv_m", "--base", z.evil, "--experts", z.e1, z.e2,
                   "--output", t / "o.safetensors", "--trust-pickle"], ["evil.pt"]),
    (lambda z, t: ["merge", "--method", "tsv_m", "--base", z.base, "--experts", z.e1, z.e2,
                   "--output", t / "o.safetensors", "--rank-fraction", "0"], ["--rank-fraction"]),
    (lambda z, t: ["info", z.truncated], ["truncated.safetensors"]),
])
def test_subprocess_errors_are_one_line(zoo: Zoo, tmp_path, args, culprits) -> None:
    result = run_cli_subprocess(args(zoo, tmp_path))
    assert_user_error(result, *culprits)
    assert list(tmp_path.iterdir()) == []
    assert not zoo.marker.exists()
