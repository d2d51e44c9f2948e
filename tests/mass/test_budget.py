"""The storage budget (mass/budget.py): byte counts, the largest common rank cut, exact truncation."""

from __future__ import annotations

import pytest
import torch

from massmerge.artifact.manifest import factor_header_bytes, factor_names
from massmerge.artifact.save import factor_tensors
from massmerge.errors import OptionError
from massmerge.lowrank import truncated_svd
from massmerge.mass.budget import (
    factor_bytes,
    fit_to_size,
    non_matrix_bytes,
    scaled_rank,
    truncate,
)
from massmerge.mass.experts import ExpertFactors


def make_factors(shape: tuple[int, int] = (10, 10), tasks: int = 2, bias: int = 0, seed: int = 0) -> ExpertFactors:
    """Full-rank random deltas of one matrix (and a bias of ``bias`` entries), factorized at rank 1/T."""
    gen = torch.Generator().manual_seed(seed)
    vectors = []
    for _ in range(tasks):
        tv = {"w": torch.randn(*shape, generator=gen, dtype=torch.float64)}
        if bias:
            tv["b"] = torch.randn(bias, generator=gen, dtype=torch.float64)
        vectors.append(tv)
    return ExpertFactors.build(vectors, [f"t{t}" for t in range(tasks)], rank_fraction=0.5, eps=None)


def saved_factor_bytes(factors: ExpertFactors, store: torch.dtype) -> int:
    return sum(t.numel() * t.element_size() for t in factor_tensors(factors, store).values())


@pytest.mark.parametrize(("rank", "scale", "expected"), [(5, 1.0, 5), (5, 0.5, 2), (5, 0.01, 1), (5, 0.6, 3),
                                                          (0, 0.5, 0), (48, 0.75, 36)])
def test_scaled_rank(rank: int, scale: float, expected: int) -> None:
    assert scaled_rank(rank, scale) == expected


@pytest.mark.parametrize("store", [torch.float32, torch.float16, torch.float64])
def test_byte_counts_match_the_saved_tensors(store: torch.dtype) -> None:
    factors = make_factors((12, 7), tasks=3, bias=5)
    assert factor_bytes(factors, store) + non_matrix_bytes(factors, store) == saved_factor_bytes(factors, store)
    cut = truncate(factors, 0.4)
    assert factor_bytes(factors, store, 0.4) == factor_bytes(cut, store) == (
        saved_factor_bytes(cut, store) - non_matrix_bytes(factors, store))


def test_hand_checked_cut() -> None:
    # One 10x10 float32 matrix (400 bytes), 2 tasks of rank 5; each direction costs 20*4 + 4 = 84 bytes.
    # 2.1x the base leaves 840 - 400 = 440 bytes: 5 directions, so 2 per task (scale in [0.4, 0.6)).
    factors = make_factors()
    fit = fit_to_size(factors, base_bytes=400, max_size=2.1, store=torch.float32)
    assert [f.rank for f in fit.factors.matrices["w"]] == [2, 2]
    assert 0.4 <= fit.rank_scale < 0.6
    assert fit.size_factor == pytest.approx((400 + 4 * 84) / 400)
    for full, cut in zip(factors.matrices["w"], fit.factors.matrices["w"], strict=True):
        assert torch.equal(cut.U, full.U[:, :2]) and torch.equal(cut.s, full.s[:2])
        assert torch.equal(cut.V, full.V[:, :2])
    assert fit.factors.accepted == factors.accepted and fit.factors.rank_fraction == factors.rank_fraction


def test_cut_is_the_best_lower_rank_approximation() -> None:
    """Slicing sorted factors equals a fresh rank-k' SVD of the task's delta (Eckart-Young)."""
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(16, 9, generator=gen, dtype=torch.float64)
    factors = ExpertFactors.build([{"w": delta}, {"w": -delta.flip(0)}], ["a", "b"], rank_fraction=0.6, eps=None)
    cut = truncate(factors, 0.5).matrices["w"][0]
    fresh = truncated_svd(delta, cut.rank, method="exact", dtype=torch.float64)
    torch.testing.assert_close(cut.reconstruct(), fresh.reconstruct(), rtol=1e-10, atol=1e-10)


def test_factors_that_fit_are_untouched() -> None:
    factors = make_factors()
    fit = fit_to_size(factors, base_bytes=400, max_size=3.2, store=torch.float32)  # 400 + 10 x 84 = 3.1x
    assert fit.factors is factors and fit.rank_scale == 1.0
    assert fit.size_factor == pytest.approx((400 + 10 * 84) / 400)


def test_fit_is_the_largest_cut_that_fits() -> None:
    factors = make_factors((64, 48), tasks=4, bias=64, seed=1)
    base = 64 * 48 * 4 + 64 * 4
    for max_size in (1.3, 1.6, 2.1):
        fit = fit_to_size(factors, base_bytes=base, max_size=max_size, store=torch.float32)
        assert fit.size_factor <= max_size
        assert fit.rank_scale < 1.0
        # every task has rank 24: one more direction each (scale + 1/24) no longer fits
        assert factor_bytes(factors, torch.float32, fit.rank_scale + 1 / 24) + 4 * 64 * 4 + base > max_size * base


def test_extra_bytes_count_against_the_budget() -> None:
    factors = make_factors()
    plain = fit_to_size(factors, base_bytes=400, max_size=2.1, store=torch.float32)
    # 120 extra bytes leave 320 for factors: 1 direction each
    heads = fit_to_size(factors, base_bytes=400, max_size=2.1, store=torch.float32, extra_bytes=120)
    assert sum(f.rank for f in heads.factors.matrices["w"]) < sum(f.rank for f in plain.factors.matrices["w"])


@pytest.mark.parametrize("max_size", [1.0, 0.5, -2.0])
def test_max_size_must_exceed_the_base(max_size: float) -> None:
    with pytest.raises(OptionError, match="--max-size"):
        fit_to_size(make_factors(), base_bytes=400, max_size=max_size, store=torch.float32)


def test_budget_too_small_for_one_direction_names_the_option() -> None:
    factors = make_factors(bias=200)  # 2 x 200 x 4 bytes of non-matrix deltas: 4x a 400-byte base
    with pytest.raises(OptionError, match=r"--max-size: 2.5x the base cannot hold.*extras alone are 5.00x"):
        fit_to_size(factors, base_bytes=400, max_size=2.5, store=torch.float32)


def test_metadata_estimate_covers_the_real_headers(tmp_path) -> None:
    from safetensors.torch import save_file

    factors = make_factors((12, 7), tasks=3, bias=5)
    tensors = factor_tensors(factors, torch.float32)
    save_file(tensors, tmp_path / "f.safetensors")
    headers = (tmp_path / "f.safetensors").stat().st_size - saved_factor_bytes(factors, torch.float32)
    assert 0 < headers <= factor_header_bytes(factors)
    assert sorted(tensors) == sorted(factor_names(factors.task_names, factors.matrices, factors.non_matrix))


def test_budget_takes_the_header_estimate_and_knows_no_file_format() -> None:
    """The header bytes are the caller's argument (the artifact layer's estimate): a larger one cuts deeper, and
    budget.py spells no tensor name of the artifact format (layer 2 under layer 5)."""
    import inspect

    from massmerge.mass import budget

    base = budget.tensor_bytes([torch.zeros(40, 40, dtype=torch.float64)])
    light = budget.stored_factors(make_factors(shape=(40, 40), tasks=4), [], base, torch.float16, 1.5, header_bytes=0)
    heavy = budget.stored_factors(make_factors(shape=(40, 40), tasks=4), [], base, torch.float16, 1.5,
                                  header_bytes=base // 4)
    assert heavy.rank_scale < light.rank_scale < 1.0
    assert heavy.size_factor <= 1.5 and light.size_factor <= 1.5
    source = inspect.getsource(budget)
    assert "factors/" not in source and "non_matrix/" not in source and "safetensors" not in source


@pytest.mark.parametrize("max_size", [0, 1.5])
def test_stored_factors_round_without_a_second_copy(max_size: float) -> None:
    """The stored factors equal round_factors of the input (float16 and back), built in place: at the design
    ranks the very same tensors come back; after a cut the input is emptied (its full-rank copy released)."""
    import copy

    from massmerge.mass.storage import round_factors
    from massmerge.mass.budget import stored_factors, tensor_bytes

    factors = make_factors(shape=(40, 40), tasks=4, bias=40)
    expected = round_factors(copy.deepcopy(factors), torch.float16)
    original_u = factors.matrices["w"][0].U
    base = tensor_bytes([torch.zeros(40, 40, dtype=torch.float64), torch.zeros(40, dtype=torch.float64)])
    stored = stored_factors(factors, [], base, torch.float16, max_size, header_bytes=0)
    got = stored.factors.matrices["w"]
    if max_size == 0:
        assert got[0].U is original_u and stored.rank_scale == 1.0
        ranks = [f.rank for f in expected.matrices["w"]]
    else:
        assert stored.rank_scale < 1.0 and factors.matrices == {}
        ranks = [f.rank for f in got]
    for f, e, k in zip(got, expected.matrices["w"], ranks):
        assert torch.equal(f.U, e.U[:, :k]) and torch.equal(f.V, e.V[:, :k]) and torch.equal(f.s, e.s[:k])
        assert torch.equal(f.U, f.U.to(torch.float16).to(f.U.dtype))  # exactly representable in storage
    assert torch.equal(stored.factors.non_matrix["b"][0], expected.non_matrix["b"][0])
