"""A write that fails half way (disk full, interrupt) leaves no partial file and the previous output intact."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import pytest
import torch
from robust_helpers import Zoo, assert_user_error, digest, leftovers, run_cli
from robust_helpers import small_tmpfs as mount_small_tmpfs
from safetensors.torch import save_file

from massmerge import checkpoints
from massmerge.checkpoints import load_state_dict, save_state_dict
from massmerge.errors import CheckpointError


def half_then_enospc(tensors, filename, metadata=None):
    """Write the first half of the real file, then fail as a full disk does."""
    real = Path(filename).with_name(Path(filename).name + ".real")
    save_file(tensors, str(real), metadata=metadata)
    data = real.read_bytes()
    real.unlink()
    Path(filename).write_bytes(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))


def half_then_interrupt(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\0" * 100)
    raise KeyboardInterrupt


def merge_args(zoo: Zoo, output: Path) -> list:
    return ["merge", "--method", "tsv_m", "--base", zoo.base, "--experts", zoo.e1, zoo.e2, "--output", output]


@pytest.mark.parametrize("previous", [False, True])
def test_cli_disk_full_patched_writer(zoo: Zoo, tmp_path, capsys, monkeypatch, previous) -> None:
    output = tmp_path / "merged.safetensors"
    if previous:
        assert run_cli(merge_args(zoo, output), capsys).code == 0
        before = digest(output)
    monkeypatch.setattr(checkpoints, "save_file", half_then_enospc)
    line = assert_user_error(run_cli(merge_args(zoo, output), capsys), "No space left on device")
    assert output.name in line
    if previous:
        assert digest(output) == before
        assert leftovers(tmp_path, keep=[output]) == []
    else:
        assert leftovers(tmp_path) == []


def test_cli_interrupt_during_write(zoo: Zoo, tmp_path, capsys, monkeypatch) -> None:
    output = tmp_path / "merged.safetensors"
    assert run_cli(merge_args(zoo, output), capsys).code == 0
    before = digest(output)
    monkeypatch.setattr(checkpoints, "save_file", half_then_interrupt)
    result = run_cli(merge_args(zoo, output), capsys)
    assert result.code != 0  # click reports Ctrl-C itself (130), not as a bad input (2)
    assert "Traceback" not in result.out + result.err
    assert digest(output) == before
    assert leftovers(tmp_path, keep=[output]) == []


def test_save_state_dict_disk_full_python(tmp_path, monkeypatch) -> None:
    path = tmp_path / "x.safetensors"
    save_state_dict({"a": torch.ones(3)}, path)
    before = digest(path)
    monkeypatch.setattr(checkpoints, "save_file", half_then_enospc)
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        save_state_dict({"a": torch.zeros(300)}, path)
    assert str(path) in str(info.value) and ".tmp" not in str(info.value)  # the user's path, not the temp file
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC  # library callers' contract
    assert digest(path) == before
    assert leftovers(tmp_path, keep=[path]) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 64 KiB tmpfs (needs root and mount permission; skipped cleanly otherwise)."""
    with mount_small_tmpfs(tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}", 64 * 1024) as mount_point:
        yield mount_point


@pytest.fixture
def big_zoo(tmp_path) -> dict[str, Path]:
    """Base and two experts of ~130 KiB each: their merge cannot fit in a 64 KiB tmpfs."""
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(128, 128, generator=g), "b.weight": torch.randn(128, 128, generator=g)}
    paths = {"base": tmp_path / "base.safetensors"}
    save_file(base, str(paths["base"]))
    for i in (1, 2):
        paths[f"e{i}"] = tmp_path / f"e{i}.safetensors"
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(paths[f"e{i}"]))
    return paths


def test_cli_disk_full_real_tmpfs(zoo: Zoo, big_zoo, small_tmpfs, capsys) -> None:
    previous = small_tmpfs / "merged.safetensors"
    assert run_cli(merge_args(zoo, previous), capsys).code == 0  # a small valid earlier output
    before = digest(previous)
    result = run_cli(["merge", "--method", "task_arithmetic", "--base", big_zoo["base"],
                      "--experts", big_zoo["e1"], big_zoo["e2"], "--output", previous], capsys)
    assert_user_error(result, "No space left on device")
    assert digest(previous) == before
    assert load_state_dict(previous)  # still a readable checkpoint
    assert leftovers(small_tmpfs, keep=[previous]) == []
