"""CheckedTaskVector: the one checked task-vector view behind `merge`, `merging.merge` and the MASS stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from massmerge.checkpoints import all_finite, open_checkpoint, save_state_dict
from massmerge.errors import CheckpointError
from massmerge.task_vectors import CheckedTaskVector, KeyFilter, add_delta


@pytest.fixture
def files(tmp_path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    torch.manual_seed(0)
    base = {"w": torch.randn(5, 4), "b": torch.randn(5), "ids": torch.arange(3)}
    expert = {"w": base["w"] + 0.1, "b": base["b"] - 0.2, "ids": torch.arange(3)}
    save_state_dict(expert, tmp_path / "e.safetensors")
    return base, tmp_path / "e.safetensors"


def test_expert_delta_is_checked_fresh_and_read_once(files):
    base, path = files
    lazy = open_checkpoint(path)
    tv = CheckedTaskVector(base, lazy, name=str(path))
    assert list(tv) == ["w", "b"] and tv.shape("w") == (5, 4) and tv.work_dtype("w") == torch.float32
    delta = tv["w"]
    assert torch.allclose(delta, torch.full((5, 4), 0.1), atol=1e-6)
    delta += 1  # ours to change: the next read is unaffected
    assert torch.allclose(tv["w"], torch.full((5, 4), 0.1), atol=1e-6)
    assert torch.equal(tv.read("w", slice(1, 3)), tv["w"][1:3])
    out = torch.empty(5, 4)
    assert tv.read("w", out=out).data_ptr() == out.data_ptr()


def test_user_task_vectors_are_never_modified(files):
    base, _ = files
    mine = {"w": torch.ones(5, 4), "b": torch.ones(5)}
    tv = CheckedTaskVector(base, mine, name="task vector 0", is_delta=True)
    tv["w"].add_(5)
    tv.read("b", out=torch.empty(5)).add_(5)
    assert torch.equal(mine["w"], torch.ones(5, 4)) and torch.equal(mine["b"], torch.ones(5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_and_wrong_shape_are_named(files, bad):
    base, _ = files
    tv = CheckedTaskVector(base, {"w": torch.full((5, 4), bad), "b": torch.zeros(4)}, name="e.safetensors")
    with pytest.raises(CheckpointError, match=r"e\.safetensors: key 'w' contains NaN or Inf"):
        tv["w"]
    with pytest.raises(CheckpointError, match=r"e\.safetensors: key 'b' has shape \[4\], the base has \[5\]"):
        tv["b"]


def test_missing_key_is_named_and_filter_applies(files):
    base, path = files
    with pytest.raises(CheckpointError, match="key 'b' of the base is missing"):
        CheckedTaskVector(base, {"w": torch.zeros(5, 4)}, name="e")
    only_w = CheckedTaskVector(base, open_checkpoint(path), key_filter=KeyFilter(exclude=("b",)))
    assert list(only_w) == ["w"] and only_w.name == str(path)


def test_all_finite_matches_isfinite_including_overflowing_sums():
    huge = torch.full((4,), 3e38)  # finite values whose float32 sum overflows
    assert all_finite(huge) and all_finite(torch.arange(3)) and all_finite(torch.zeros(0))
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.ones(10, dtype=dtype)
        assert all_finite(x)
        x[3] = float("nan")
        assert not all_finite(x)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_add_delta_in_place_rounds_as_the_copy(alpha):
    base, delta = torch.randn(50), torch.randn(50)
    expected = add_delta(base, delta, alpha)
    assert torch.equal(add_delta(base, delta.clone(), alpha, inplace=True), expected)
    half = base.to(torch.bfloat16)
    assert torch.equal(add_delta(half, delta.clone(), alpha, inplace=True), add_delta(half, delta, alpha))
