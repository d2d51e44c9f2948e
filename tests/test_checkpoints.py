"""Loading and validating state dicts: safetensors files, HF model directories (sharded too), atomic saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from massmerge.checkpoints import (
    check_finite,
    load_state_dict,
    open_checkpoint,
    save_state_dict,
    safetensors_model_dir,
    validate_compatible,
)
from massmerge.errors import CheckpointError
from massmerge.task_vectors import CheckedTaskVector, KeyFilter, task_vector


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    return BertModel(config)


def test_hf_directory_single_and_sharded_give_the_same_state(tmp_path: Path):
    model = tiny_bert()
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    single = load_state_dict(tmp_path / "single")
    sharded = load_state_dict(tmp_path / "sharded")
    assert set(single) == set(sharded)
    for key in single:
        assert torch.equal(single[key], sharded[key])
    # the keys are the model's own state-dict names
    assert set(single) <= set(model.state_dict())


def test_lazy_checkpoint_reads_shapes_without_data(tmp_path: Path):
    save_file({"a": torch.ones(3, 4), "b": torch.zeros(2, dtype=torch.float16)}, str(tmp_path / "x.safetensors"))
    lazy = open_checkpoint(tmp_path / "x.safetensors")
    assert len(lazy) == 2 and lazy.shape("a") == (3, 4) and lazy.dtype_name("b") == "F16"
    assert torch.equal(lazy["a"], torch.ones(3, 4))
    with pytest.raises(KeyError):
        lazy["missing"]


def test_missing_shard_is_named(tmp_path: Path):
    tiny_bert().save_pretrained(tmp_path / "m", max_shard_size="20KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "m" / shard).unlink()
    with pytest.raises(CheckpointError, match=shard):
        open_checkpoint(tmp_path / "m")


@pytest.mark.parametrize("name", ["model.bin", "model.pt"])
def test_pickle_refused_without_trust(tmp_path: Path, name: str):
    torch.save({"w": torch.ones(2)}, tmp_path / name)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_state_dict(tmp_path / name)
    assert torch.equal(load_state_dict(tmp_path / name, trust_pickle=True)["w"], torch.ones(2))


def test_not_an_hf_directory(tmp_path: Path):
    (tmp_path / "README").write_text("hi")
    with pytest.raises(CheckpointError, match="not an HF model directory"):
        load_state_dict(tmp_path)


def test_validate_names_key_shape_and_dtype():
    base = {"a": torch.zeros(2, 3), "b": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="e.safetensors: key 'b' of the base is missing"):
        validate_compatible(base, {"a": torch.zeros(2, 3)}, name="e.safetensors")
    with pytest.raises(CheckpointError, match="key 'c' is not in the base"):
        validate_compatible(base, {**base, "c": torch.zeros(1)}, name="e")
    with pytest.raises(CheckpointError, match=r"key 'a' has shape \[3, 2\]"):
        validate_compatible(base, {"a": torch.zeros(3, 2), "b": torch.zeros(3)}, name="e")
    with pytest.raises(CheckpointError, match="key 'b' has dtype torch.float16"):
        validate_compatible(base, {"a": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.float16)}, name="e")


def test_validate_lazy_dtypes(tmp_path: Path):
    save_file({"a": torch.zeros(2, dtype=torch.bfloat16)}, str(tmp_path / "e.safetensors"))
    with pytest.raises(CheckpointError, match="dtype torch.bfloat16"):
        validate_compatible({"a": torch.zeros(2)}, open_checkpoint(tmp_path / "e.safetensors"), name="e")
    validate_compatible({"a": torch.zeros(2, dtype=torch.bfloat16)}, open_checkpoint(tmp_path / "e.safetensors"),
                        name="e")


@pytest.mark.parametrize("bad,kind", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_check_finite(bad: float, kind: str):
    state = {"ok": torch.ones(2), "w": torch.tensor([1.0, bad])}
    with pytest.raises(CheckpointError, match=f"key 'w' contains {kind}"):
        check_finite(state, name="f")


def test_atomic_save_keeps_previous_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "out.safetensors"
    save_state_dict({"a": torch.ones(2)}, out)
    before = out.read_bytes()

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("massmerge.checkpoints.save_file", failing_save)
    with pytest.raises(OSError):
        save_state_dict({"a": torch.zeros(2)}, out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_task_vectors_and_key_filter():
    base = {"vision.w": torch.ones(2, 2), "text.w": torch.ones(2), "ids": torch.arange(2)}
    expert = {"vision.w": 3 * torch.ones(2, 2), "text.w": torch.zeros(2), "ids": torch.arange(2)}
    full = task_vector(base, expert)
    assert set(full) == {"vision.w", "text.w"}  # integer buffers are not task vectors
    assert torch.equal(full["vision.w"], 2 * torch.ones(2, 2))
    only_vision = KeyFilter.from_patterns(exclude=["text.*"])
    lazy = CheckedTaskVector(base, expert, key_filter=only_vision)
    assert list(lazy) == ["vision.w"] and torch.equal(lazy["vision.w"], full["vision.w"])
    assert list(task_vector(base, expert, key_filter=KeyFilter.from_patterns(include=["text.*"]))) == ["text.w"]


def test_half_precision_deltas_are_computed_in_float32():
    base = {"w": torch.tensor([1000.0], dtype=torch.float16)}
    expert = {"w": torch.tensor([1001.0], dtype=torch.float16)}
    delta = task_vector(base, expert)["w"]
    assert delta.dtype == torch.float32 and float(delta) == 1.0


def test_saved_files_follow_the_umask(tmp_path: Path):
    """atomic_write/save_state_dict give 0666 less the umask (0644 under 022), not mkstemp's 0600."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        save_state_dict({"a": torch.ones(2)}, tmp_path / "m.safetensors")
        assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644
        os.umask(0o077)
        save_state_dict({"a": torch.ones(2)}, tmp_path / "private.safetensors")
        assert stat.S_IMODE((tmp_path / "private.safetensors").stat().st_mode) == 0o600
    finally:
        os.umask(previous)


def test_lazy_membership_and_validation_read_no_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    save_file({"a": torch.ones(3, 4), "b": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    lazy = open_checkpoint(tmp_path / "x.safetensors")
    monkeypatch.setattr(type(lazy), "borrow", lambda self, key: pytest.fail(f"read {key}"))
    assert "a" in lazy and "c" not in lazy
    validate_compatible({"a": torch.zeros(3, 4), "b": torch.zeros(2)}, lazy, name="x")


def test_lazy_reads_are_fresh_copies_and_borrow_is_zero_copy(tmp_path: Path):
    save_file({"w": torch.arange(6.0).reshape(2, 3), "e": torch.zeros(0)}, str(tmp_path / "x.safetensors"))
    lazy = open_checkpoint(tmp_path / "x.safetensors")
    first = lazy["w"]
    first += 100  # the caller owns what __getitem__ returns
    assert torch.equal(lazy["w"], torch.arange(6.0).reshape(2, 3))
    with lazy.borrow("w") as view:
        assert torch.equal(view, torch.arange(6.0).reshape(2, 3))
    assert lazy["e"].shape == (0,)


# ----- a pytorch_model.bin-only HF directory, converted once to safetensors ---------------------------------------

def _pickle_dir(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path / "openai"
    folder.mkdir()
    tied = torch.randn(5, 3)
    state = {"a.weight": tied, "b.weight": tied, "view": torch.arange(12.0)[2:6], "ids": torch.arange(7)[None]}
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text('{"model_type": "clip"}')
    (folder / "vocab.json").write_text("{}")
    (folder / "tf_model.h5").write_bytes(b"junk")
    return folder, state


def test_pickle_dir_is_refused_in_one_line_naming_file_and_option(tmp_path: Path) -> None:
    folder, _ = _pickle_dir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        safetensors_model_dir(folder, trust_pickle=False, cache=tmp_path / "cache")
    message = str(info.value)
    assert message.startswith(f"{folder / 'pytorch_model.bin'}: pickle") and "\n" not in message
    assert "--trust-pickle" in message and "trust_pickle" in message
    assert not (tmp_path / "cache").exists()


def test_pickle_dir_converts_once_and_is_read_as_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, state = _pickle_dir(tmp_path)
    converted = safetensors_model_dir(folder, trust_pickle=True, cache=tmp_path / "cache")
    assert converted.parent == tmp_path / "cache"
    assert sorted(p.name for p in converted.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    lazy = open_checkpoint(converted)  # the safetensors reader, no pickle
    assert sorted(lazy) == sorted(state)
    for key, value in state.items():
        assert torch.equal(lazy[key], value) and lazy[key].dtype == value.dtype, key
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the pickle was read again"))
    assert safetensors_model_dir(folder, trust_pickle=True, cache=tmp_path / "cache") == converted


def test_conversion_is_keyed_by_the_pickles_content(tmp_path: Path) -> None:
    folder, state = _pickle_dir(tmp_path)
    first = safetensors_model_dir(folder, trust_pickle=True, cache=tmp_path / "cache")
    torch.save({**state, "ids": torch.arange(8)[None]}, folder / "pytorch_model.bin")
    second = safetensors_model_dir(folder, trust_pickle=True, cache=tmp_path / "cache")
    assert second != first and open_checkpoint(second)["ids"].shape == (1, 8)


def test_a_pickle_that_is_not_tensors_leaves_no_cache_entry(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    torch.save({"w": torch.zeros(2), "note": Path("x")}, folder / "pytorch_model.bin")  # not weights-only
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot load as a weights-only torch file"):
        safetensors_model_dir(folder, trust_pickle=True, cache=tmp_path / "cache")
    assert not any(p.name.endswith("model.safetensors") for p in (tmp_path / "cache").rglob("*"))


def test_safetensors_beside_a_pickle_are_used_as_they_are(tmp_path: Path) -> None:
    folder = tmp_path / "l14"
    folder.mkdir()
    save_state_dict({"w": torch.ones(2)}, folder / "model.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"junk: never opened")
    assert safetensors_model_dir(folder, trust_pickle=False, cache=tmp_path / "cache") == folder
    assert not (tmp_path / "cache").exists()
