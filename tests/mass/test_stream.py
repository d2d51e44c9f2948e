"""Streaming merge: experts opened one at a time, each tensor read once, same factors as in memory."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from massmerge.checkpoints import open_checkpoint, save_state_dict
from massmerge.errors import CheckpointError
from massmerge.mass import ExpertFactors
from massmerge.mass.stream import build_factors
from massmerge.task_vectors import KeyFilter

from toy_mass import ToyEncoder, make_experts

NUM_TASKS = 5


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[dict[str, torch.Tensor], list[Path], list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("zoo")
    base = ToyEncoder().state_dict()
    tvs = make_experts(ToyEncoder(), NUM_TASKS, seed=3)
    paths = []
    for t, tv in enumerate(tvs):
        paths.append(root / f"expert{t}.safetensors")
        save_state_dict({k: base[k] + tv[k] for k in base}, paths[-1])
    return base, paths, [{k: (base[k] + tv[k]) - base[k] for k in base} for tv in tvs]


class Tracked(Mapping[str, torch.Tensor]):
    """A lazily opened expert that counts reads and reports how many experts are alive at once."""

    alive: set[int] = set()
    peak = 0
    reads: dict[str, int] = {}

    def __init__(self, path: Path) -> None:
        self.inner = open_checkpoint(path)
        Tracked.alive.add(id(self))
        Tracked.peak = max(Tracked.peak, len(Tracked.alive))
        weakref.finalize(self, Tracked.alive.discard, id(self))

    def __getitem__(self, key: str) -> torch.Tensor:
        Tracked.reads[key] = Tracked.reads.get(key, 0) + 1
        return self.inner[key]

    def __iter__(self):  # noqa: ANN204
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def opener(path: Path) -> Tracked:
    gc.collect()  # drop any expert the consumer has let go of, so 'alive' counts only held ones
    return Tracked(path)


def test_experts_open_one_at_a_time_and_each_tensor_is_read_once(zoo):
    base, paths, _ = zoo
    Tracked.alive.clear()
    Tracked.peak = 0
    Tracked.reads = {}
    build_factors(base, paths, [f"t{i}" for i in range(NUM_TASKS)], open_expert=opener)
    assert Tracked.peak <= 2  # the one being read, plus at most the previous one awaiting collection
    assert set(Tracked.reads) == set(base)
    assert set(Tracked.reads.values()) == {NUM_TASKS}


def test_streamed_factors_equal_in_memory_factors(zoo):
    base, paths, tvs = zoo
    names = [f"t{i}" for i in range(NUM_TASKS)]
    streamed = build_factors(base, paths, names)
    in_memory = ExpertFactors.build(iter(tvs), names)
    assert streamed.accepted == in_memory.accepted
    for key, per_task in in_memory.matrices.items():
        for a, b in zip(streamed.matrices[key], per_task):
            assert torch.allclose(a.reconstruct(), b.reconstruct(), atol=1e-6)
    for key, per_task in in_memory.non_matrix.items():
        assert all(torch.equal(a, b) for a, b in zip(streamed.non_matrix[key], per_task))


def test_key_filter_limits_what_is_factorized(zoo):
    base, paths, _ = zoo
    factors = build_factors(base, paths[:2], ["a", "b"], key_filter=KeyFilter(exclude=("embed.*", "position")))
    assert "embed.weight" not in factors.matrices and "position" not in factors.matrices
    assert "blocks.0.fc1.weight" in factors.matrices


def test_nan_expert_refused_naming_file_and_key(zoo, tmp_path):
    base, paths, _ = zoo
    bad = dict(open_checkpoint(paths[1]).items())
    bad["blocks.1.fc2.weight"] = bad["blocks.1.fc2.weight"].clone()
    bad["blocks.1.fc2.weight"][0, 0] = float("inf")
    save_state_dict(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: key 'blocks\.1\.fc2\.weight' contains NaN or Inf"):
        build_factors(base, [paths[0], tmp_path / "bad.safetensors"], ["a", "b"])


def test_wrong_shape_and_missing_key_refused(zoo, tmp_path):
    base, paths, _ = zoo
    state = dict(open_checkpoint(paths[1]).items())
    state["final.weight"] = torch.zeros(3, 3)
    save_state_dict(state, tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError, match=r"shape\.safetensors: key 'final\.weight' has shape \[3, 3\]"):
        build_factors(base, [paths[0], tmp_path / "shape.safetensors"], ["a", "b"])
    del state["final.weight"]
    save_state_dict(state, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: key 'final\.weight' of the base is missing"):
        build_factors(base, [paths[0], tmp_path / "missing.safetensors"], ["a", "b"])
