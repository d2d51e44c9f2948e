"""Truncated SVD and polar factor against exact float64 numpy references (design.md section 3: 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from massmerge.errors import OptionError
from massmerge.lowrank import LowRank, polar, rank_for, truncated_svd

from lowrank_fixtures import low_rank


def rel(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def numpy_truncated(m: np.ndarray, k: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.mark.parametrize("shape,k", [((8, 5), 1), ((8, 5), 5), ((5, 8), 2), ((30, 30), 7)])
def test_exact_svd_matches_numpy(rng, shape, k):
    m = rng.standard_normal(shape)
    lr = truncated_svd(torch.from_numpy(m), k, method="exact", dtype=torch.float64)
    assert lr.U.shape == (shape[0], k) and lr.V.shape == (shape[1], k) and lr.s.shape == (k,)
    assert rel(lr.reconstruct(), numpy_truncated(m, k)) < 1e-10
    np.testing.assert_allclose(lr.s.numpy(), np.linalg.svd(m, compute_uv=False)[:k], rtol=1e-10)
    np.testing.assert_allclose((lr.U.T @ lr.U).numpy(), np.eye(k), atol=1e-10)
    np.testing.assert_allclose((lr.V.T @ lr.V).numpy(), np.eye(k), atol=1e-10)


def test_float32_default_meets_design_bound(rng):
    m = low_rank(rng, 64, 48, 10) + 1e-3 * torch.from_numpy(rng.standard_normal((64, 48)))
    lr = truncated_svd(m.float(), 10)
    assert lr.U.dtype == torch.float32
    assert rel(lr.reconstruct(), numpy_truncated(m.numpy(), 10)) < 1e-4


def test_randomized_matches_exact_within_bound(rng):
    """The randomized path is allowed only where it meets 1e-4 relative against the exact SVD."""
    big = low_rank(rng, 1024, 768, 24) + 1e-4 * torch.from_numpy(rng.standard_normal((1024, 768)))
    exact = truncated_svd(big, 24, method="exact")
    randomized = truncated_svd(big, 24, method="randomized")
    assert rel(randomized.reconstruct(), exact.reconstruct()) < 1e-4
    assert rel(randomized.s, exact.s) < 1e-4
    # subspaces agree: projectors onto the column/row spaces
    assert rel(randomized.U @ randomized.U.T, exact.U @ exact.U.T) < 1e-4
    assert rel(randomized.V @ randomized.V.T, exact.V @ exact.V.T) < 1e-4


@pytest.mark.parametrize("shape", [(2000, 48), (48, 2000), (1536, 384)])
def test_gram_path_of_tall_and_wide_matrices_meets_the_bound(rng, shape):
    """Tall/wide float32 matrices take the float64 Gram path of the exact SVD; against numpy's float64 SVD it
    meets design.md's 1e-4 on the reconstruction, the singular values and both subspaces. Float64 requests keep
    LAPACK (checked to 1e-9)."""
    from massmerge.lowrank import _use_gram

    assert _use_gram(*shape)
    m, n = shape
    k = min(m, n) // 4
    decay = np.exp(-np.arange(min(m, n)) / 20.0)  # a decaying spectrum like a fine-tuning delta's
    u = np.linalg.qr(rng.standard_normal((m, min(m, n))))[0]
    v = np.linalg.qr(rng.standard_normal((n, min(m, n))))[0]
    dense = (u * decay) @ v.T
    ref_u, ref_s, ref_vh = np.linalg.svd(dense, full_matrices=False)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        lr = truncated_svd(torch.from_numpy(dense), k, method="exact", dtype=dtype)
        assert lr.U.dtype == dtype and lr.rank == k
        assert rel(lr.reconstruct(), numpy_truncated(dense, k)) < tol
        assert rel(lr.s, ref_s[:k]) < tol
        assert rel(lr.U @ lr.U.T, ref_u[:, :k] @ ref_u[:, :k].T) < tol
        assert rel(lr.V @ lr.V.T, ref_vh[:k].T @ ref_vh[:k]) < tol


def test_auto_picks_randomized_only_for_large_low_rank():
    from massmerge.lowrank import _use_randomized

    assert _use_randomized(3072, 768, 96)
    assert not _use_randomized(64, 64, 8)
    assert not _use_randomized(1024, 768, 384)


def test_randomized_is_deterministic_and_keeps_global_rng(rng):
    m = torch.from_numpy(rng.standard_normal((600, 600))).float()
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a = truncated_svd(m, 10, method="randomized")
    after = torch.rand(1)
    b = truncated_svd(m, 10, method="randomized")
    assert torch.equal(a.U, b.U) and torch.equal(a.s, b.s)
    assert torch.equal(before, after)


def test_polar_matches_numpy_reference(rng):
    a = rng.standard_normal((20, 6))
    u, _, vh = np.linalg.svd(a, full_matrices=False)
    expected = u @ vh
    got = polar(torch.from_numpy(a))
    assert rel(got, expected) < 1e-10
    np.testing.assert_allclose((got.T @ got).numpy(), np.eye(6), atol=1e-10)


def test_polar_is_closest_orthonormal_matrix(rng):
    """Among matrices with orthonormal columns, the polar factor minimizes ||A - Q||_F."""
    a = torch.from_numpy(rng.standard_normal((10, 4)))
    best = float((a - polar(a)).norm())
    for _ in range(50):
        q, _ = torch.linalg.qr(torch.from_numpy(rng.standard_normal((10, 4))))
        assert float((a - q).norm()) >= best - 1e-12


def test_polar_of_orthonormal_is_identity_map(rng):
    q, _ = torch.linalg.qr(torch.from_numpy(rng.standard_normal((15, 5))))
    assert rel(polar(q), q) < 1e-12


@pytest.mark.parametrize("shape,fraction,expected", [((768, 3072), 1 / 8, 96), ((10, 7), 0.5, 3), ((4, 4), 0.01, 1)])
def test_rank_for(shape, fraction, expected):
    assert rank_for(shape, fraction) == expected


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_rank_for_rejects_out_of_range(fraction):
    with pytest.raises(OptionError, match="rank-fraction"):
        rank_for((4, 4), fraction)


def test_lowrank_numel_is_k_times_m_plus_n_plus_one():
    lr = LowRank(torch.zeros(7, 3), torch.zeros(3), torch.zeros(5, 3))
    assert lr.numel() == 3 * (7 + 5 + 1)
