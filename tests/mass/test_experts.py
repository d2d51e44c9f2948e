"""Per-task factors: shapes and default ranks, the low-rank cosine, de-redundancy, the rank-k reconstruction of one
task, and bad task lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from massmerge.errors import OptionError
from massmerge.lowrank import truncated_svd
from massmerge.mass import ExpertFactors
from massmerge.mass.experts import deredundant_tasks, lowrank_cosine

from lowrank_fixtures import low_rank, rel



def test_lowrank_cosine_matches_dense(rng):
    a = truncated_svd(low_rank(rng, 15, 11, 4), 4, dtype=torch.float64)
    b = truncated_svd(low_rank(rng, 15, 11, 4) + 0.5 * a.reconstruct(), 4, dtype=torch.float64)
    da, db = a.reconstruct().numpy().ravel(), b.reconstruct().numpy().ravel()
    assert abs(lowrank_cosine(a, b) - da @ db / np.linalg.norm(da) / np.linalg.norm(db)) < 1e-10


def test_deredundancy_drops_a_duplicated_expert(rng):
    tvs = [{"w": low_rank(rng, 16, 12, 3), "b": torch.from_numpy(rng.standard_normal(16))} for _ in range(3)]
    tvs.append({k: v.clone() for k, v in tvs[1].items()})  # task 3 duplicates task 1
    factors = ExpertFactors.build(iter(tvs), ["a", "b", "c", "d"], eps=0.3, dtype=torch.float64)
    assert factors.accepted["w"] == [0, 1, 2]
    assert factors.dropped() == {"w": ["d"]}
    off = ExpertFactors.build(iter(tvs), ["a", "b", "c", "d"], eps=None, dtype=torch.float64)
    assert off.accepted["w"] == [0, 1, 2, 3] and off.dropped() == {}


def test_deredundancy_order_and_first_task_always_kept(rng):
    a = truncated_svd(low_rank(rng, 10, 10, 2), 2, dtype=torch.float64)
    assert deredundant_tasks([a, a, a], eps=0.3) == [0]
    assert deredundant_tasks([a], eps=0.0) == [0]


def test_factors_shapes_and_default_rank(rng):
    tvs = [{"w": low_rank(rng, 40, 20, 10), "b": torch.zeros(40, dtype=torch.float64)} for _ in range(4)]
    factors = ExpertFactors.build(iter(tvs), list("abcd"))
    assert factors.rank_fraction == 0.25
    assert [f.rank for f in factors.matrices["w"]] == [5] * 4  # floor(20 / 4)
    assert factors.numel() == 4 * 5 * (40 + 20 + 1) + 4 * 40


def test_merged_delta_of_one_task_is_its_rank_k_reconstruction(rng):
    tvs = [{"w": torch.from_numpy(rng.standard_normal((12, 9)))} for _ in range(3)]
    factors = ExpertFactors.build(iter(tvs), list("abc"), dtype=torch.float64)
    u, s, vh = np.linalg.svd(tvs[2]["w"].numpy(), full_matrices=False)
    assert rel(factors.merged_delta([2])["w"], (u[:, :3] * s[:3]) @ vh[:3]) < 1e-10


@pytest.mark.parametrize("names,error", [(["a"], "at least 2"), (["a", "a"], "listed twice")])
def test_factor_build_rejects_bad_task_lists(rng, names, error):
    tvs = [{"w": low_rank(rng, 4, 4, 1)} for _ in names]
    with pytest.raises(OptionError, match=error):
        ExpertFactors.build(iter(tvs), names)


def test_indistinct_tasks_name_zero_and_identical_experts() -> None:
    """A zero task vector and two equal ones are found (and nothing else); the note names them once."""
    from massmerge.mass.experts import indistinct_note, indistinct_tasks

    gen = torch.Generator().manual_seed(0)
    tv = lambda: {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(6, generator=gen)}  # noqa: E731
    twin, other = tv(), tv()
    zero = {"w": torch.zeros(6, 5), "b": torch.zeros(6)}
    factors = ExpertFactors.build(iter([twin, zero, dict(twin), other]), ["a", "z", "a2", "other"], eps=None)
    assert indistinct_tasks(factors) == (["z"], [("a", "a2")])
    note = indistinct_note(factors)
    assert note is not None and "of z are all zero" in note and "a = a2" in note and "other" not in note
    distinct = ExpertFactors.build(iter([tv(), tv()]), ["x", "y"], eps=None)
    assert indistinct_tasks(distinct) == ([], []) and indistinct_note(distinct) is None
