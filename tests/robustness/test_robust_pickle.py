"""A pickle that would run code when unpickled must never run, whatever entry point or flag is used.

The payload's ``__reduce__`` calls ``open(marker, 'w')``; the first tests prove that plain unpickling really
would create the marker, so the absence of the marker afterwards means something.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from robust_helpers import (
    Payload,
    Zoo,
    assert_user_error,
    expert_state,
    leftovers,
    run_cli,
)

from massmerge.checkpoints import load_state_dict, open_checkpoint
from massmerge.errors import MassMergeError

EVIL = ["evil", "evil_bin", "evil_pkl", "evil_named", "evil_hf"]


def evil_path(zoo: Zoo, name: str):
    return {"evil": zoo.root / "evil.pt", "evil_bin": zoo.root / "evil.bin", "evil_pkl": zoo.root / "evil.pkl",
            "evil_named": zoo.root / "evil_named.safetensors", "evil_hf": zoo.root / "evil_hf"}[name]


def test_payload_is_live_with_plain_pickle(tmp_path) -> None:
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_payload_is_live_with_unsafe_torch_load(tmp_path) -> None:
    marker = tmp_path / "marker"
    torch.save({"w": torch.zeros(2), "evil": Payload(marker)}, str(tmp_path / "x.pt"))
    torch.load(str(tmp_path / "x.pt"), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("trust", [False, True])
@pytest.mark.parametrize("name", EVIL)
def test_python_loaders_never_run_payload(zoo: Zoo, name, trust) -> None:
    path = evil_path(zoo, name)
    with pytest.raises(MassMergeError) as info:
        load_state_dict(path, trust_pickle=trust)
    assert path.name in str(info.value)
    with pytest.raises(MassMergeError):
        open_checkpoint(path)
    assert not zoo.marker.exists()


@pytest.mark.parametrize("trust", [False, True])
@pytest.mark.parametrize("name", EVIL)
@pytest.mark.parametrize("role", ["base", "expert"])
def test_merge_never_runs_payload(zoo: Zoo, tmp_path, capsys, name, trust, role) -> None:
    path = evil_path(zoo, name)
    base, experts = (path, [zoo.e1, zoo.e2]) if role == "base" else (zoo.base, [zoo.e1, path])
    flags = ["--trust-pickle"] if trust else []
    result = run_cli(["merge", "--method", "tsv_m", "--base", base, "--experts", *experts,
                      "--output", tmp_path / "o.safetensors", *flags], capsys)
    line = assert_user_error(result, str(path))
    if not trust and name in ("evil", "evil_bin", "evil_pkl"):
        assert "--trust-pickle" in line  # the refusal says how to opt in
    assert not zoo.marker.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", EVIL)
def test_info_never_runs_payload(zoo: Zoo, capsys, name) -> None:
    path = evil_path(zoo, name)
    assert_user_error(run_cli(["info", path], capsys), str(path))
    assert not zoo.marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pkl", ".ckpt"])
def test_trusted_weights_only_pickle_works(zoo: Zoo, tmp_path, capsys, suffix) -> None:
    """Positive control: a harmless pickle of tensors merges with --trust-pickle (so the flag does something)."""
    expert = tmp_path / f"expert{suffix}"
    torch.save(expert_state(7), str(expert))
    output = tmp_path / "o.safetensors"
    refused = run_cli(["merge", "--method", "tsv_m", "--base", zoo.base, "--experts", zoo.e1, expert,
                       "--output", output], capsys)
    assert_user_error(refused, str(expert), "--trust-pickle")
    result = run_cli(["merge", "--method", "tsv_m", "--base", zoo.base, "--experts", zoo.e1, expert,
                      "--output", output, "--trust-pickle"], capsys)
    assert result.code == 0, result.err
    assert set(load_state_dict(output)) == set(expert_state(7))


def test_trusted_hf_dir_with_pytorch_model_bin_works(zoo: Zoo, tmp_path, capsys) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    torch.save(expert_state(8), str(hf / "pytorch_model.bin"))
    result = run_cli(["merge", "--method", "task_arithmetic", "--base", zoo.base, "--experts", zoo.e1, hf,
                      "--output", tmp_path / "o.safetensors", "--trust-pickle"], capsys)
    assert result.code == 0, result.err
