"""Property-based tests (hypothesis) of the merge math on random small shapes, ranks and task counts.

Matrices come from a seeded generator (hypothesis draws the shapes, ranks, seeds and scalars), so singular
values are distinct with probability one and the rank-k truncation is well defined. Everything runs in
float64, where the library keeps float64 end to end, so the references can be tight.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from massmerge import merging
from massmerge.lowrank import LowRank, polar, rank_for, truncated_svd
from massmerge.mass import ExpertFactors, router
from massmerge.merging.common import tsv_merge_factors

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

dims = st.integers(min_value=1, max_value=9)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
fractions = st.sampled_from([0.1, 0.25, 1 / 3, 0.5, 0.75, 1.0])


def matrix(seed: int, m: int, n: int, rank: int | None = None, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return scale * torch.randn(m, n, generator=g, dtype=torch.float64)
    return scale * torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, n, generator=g, dtype=torch.float64)


@st.composite
def problems(draw, min_tasks: int = 2, max_tasks: int = 4):
    """(base, task vectors): two matrices of random shapes, a bias, a 0-d scalar and an int buffer."""
    m1, n1, m2, n2 = draw(dims), draw(dims), draw(dims), draw(dims)
    tasks = draw(st.integers(min_value=min_tasks, max_value=max_tasks))
    seed = draw(seeds)
    g = torch.Generator().manual_seed(seed)
    base = {
        "a.weight": torch.randn(m1, n1, generator=g, dtype=torch.float64),
        "a.bias": torch.randn(m1, generator=g, dtype=torch.float64),
        "b.weight": torch.randn(m2, n2, generator=g, dtype=torch.float64),
        "scale": torch.randn((), generator=g, dtype=torch.float64),
        "steps": torch.arange(3),
    }
    tvs = []
    for _ in range(tasks):
        rank = draw(st.integers(min_value=1, max_value=3))
        tvs.append({
            "a.weight": matrix(int(torch.randint(0, 2**31 - 1, (1,), generator=g)), m1, n1, min(rank, m1, n1), 0.1),
            "a.bias": 0.1 * torch.randn(m1, generator=g, dtype=torch.float64),
            "b.weight": 0.1 * torch.randn(m2, n2, generator=g, dtype=torch.float64),
            "scale": 0.1 * torch.randn((), generator=g, dtype=torch.float64),
        })
    return base, tvs


def options(method: str, tasks: int) -> dict:
    return {"task": tasks - 1} if method == "tsv_c" else {}


def reference_rank_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Independent rank-k truncation with numpy's float64 SVD."""
    U, s, Vt = np.linalg.svd(delta.numpy(), full_matrices=False)
    return torch.from_numpy((U[:, :k] * s[:k]) @ Vt[:k])


@pytest.mark.parametrize("method", sorted(merging.MERGE_METHODS))
@SETTINGS
@given(problem=problems())
def test_outputs_finite_shapes_and_dtypes_preserved(method, problem) -> None:
    base, tvs = problem
    merged = merging.merge(method, base, tvs, **options(method, len(tvs)))
    assert list(merged) == list(base)
    for key, value in base.items():
        assert merged[key].shape == value.shape and merged[key].dtype == value.dtype, key
        if value.is_floating_point():
            assert bool(torch.isfinite(merged[key]).all()), key
    assert torch.equal(merged["steps"], base["steps"])


@SETTINGS
@given(m=dims, n=dims, true_rank=st.integers(1, 9), fraction=fractions, seed=seeds, full=st.booleans())
def test_tsv_m_of_one_task_is_its_rank_k_reconstruction(m, n, true_rank, fraction, seed, full) -> None:
    delta = matrix(seed, m, n, None if full else min(true_rank, m, n))
    k = rank_for((m, n), fraction)
    factors = truncated_svd(delta, k, method="exact", dtype=torch.float64)
    expected = reference_rank_k(delta, k)
    scale = max(1.0, float(delta.norm()))
    torch.testing.assert_close(factors.reconstruct(), expected, atol=1e-9 * scale, rtol=0)
    torch.testing.assert_close(tsv_merge_factors([factors]), expected, atol=1e-9 * scale, rtol=0)


@SETTINGS
@given(problem=problems(), fraction=fractions)
def test_mass_single_task_set_and_tsv_c_equal_rank_k_reconstruction(problem, fraction) -> None:
    """TSV-M of S = {t} inside MASS, and TSV-C of task t, are task t's rank-k reconstruction per matrix."""
    base, tvs = problem
    names = [f"t{i}" for i in range(len(tvs))]
    factors = ExpertFactors.build(iter(tvs), names, rank_fraction=fraction, eps=None, svd="exact")
    for t, tv in enumerate(tvs):
        single = factors.merged_delta([t])
        tsv_c = merging.merge("tsv_c", base, tvs, task=t, rank_fraction=fraction, svd="exact")
        for key in ("a.weight", "b.weight"):
            expected = reference_rank_k(tv[key], rank_for(tv[key].shape, fraction))
            tol = 1e-9 * max(1.0, float(tv[key].norm()))
            torch.testing.assert_close(single[key], expected, atol=tol, rtol=0)
            torch.testing.assert_close(tsv_c[key] - base[key], expected, atol=tol, rtol=0)
        torch.testing.assert_close(single["a.bias"], tv["a.bias"])


@SETTINGS
@given(problem=problems(), a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_task_arithmetic_is_linear_in_alpha(problem, a, b) -> None:
    base, tvs = problem
    delta = {alpha: {k: v - base[k] for k, v in merging.merge("task_arithmetic", base, tvs, alpha=alpha).items()
                     if v.is_floating_point()} for alpha in (a, b, a + b, 1.0)}
    for key in delta[1.0]:
        expected = sum(tv[key] for tv in tvs)
        torch.testing.assert_close(delta[1.0][key], expected, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(delta[a][key], a * delta[1.0][key], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(delta[a + b][key], delta[a][key] + delta[b][key], atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("method", sorted(set(merging.MERGE_METHODS) - {"weight_average"}))
@SETTINGS
@given(problem=problems(), alpha=st.floats(-2, 2))
def test_every_method_scales_its_merged_delta_by_alpha(method, problem, alpha) -> None:
    """design.md: alpha scales the whole merged delta (all methods but weight_average)."""
    base, tvs = problem
    one = merging.merge(method, base, tvs, alpha=1.0, **options(method, len(tvs)))
    scaled = merging.merge(method, base, tvs, alpha=alpha, **options(method, len(tvs)))
    for key, value in base.items():
        if value.is_floating_point():
            torch.testing.assert_close(scaled[key] - value, alpha * (one[key] - value), atol=1e-10, rtol=1e-9)


@SETTINGS
@given(problem=problems())
def test_weight_average_ignores_alpha_and_is_the_mean(problem) -> None:
    base, tvs = problem
    merged = merging.merge("weight_average", base, tvs, alpha=0.37)
    for key in tvs[0]:
        torch.testing.assert_close(merged[key] - base[key], sum(tv[key] for tv in tvs) / len(tvs),
                                   atol=1e-12, rtol=1e-10)


@SETTINGS
@given(m=dims, k=st.integers(1, 9), seed=seeds)
def test_polar_factor_has_orthonormal_columns(m, k, seed) -> None:
    k = min(k, m)
    p = polar(matrix(seed, m, k))
    torch.testing.assert_close(p.T @ p, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)


@SETTINGS
@given(batch=st.integers(1, 6), tasks=st.integers(2, 6), d=st.integers(2, 10), seed=seeds,
       eta=st.floats(0.0, 0.99), top_k=st.integers(1, 8), tau=st.floats(0.05, 5.0),
       mode=st.sampled_from(["topk", "top1", "batch"]))
def test_router_probabilities_and_selection(batch, tasks, d, seed, eta, top_k, tau, mode) -> None:
    g = torch.Generator().manual_seed(seed)
    bases = [torch.linalg.qr(torch.randn(d, max(1, d // 2), generator=g))[0] for _ in range(tasks)]
    z = torch.randn(batch, d, generator=g)
    res = router.residuals(z, bases)
    assert res.shape == (batch, tasks) and bool((res >= -1e-6).all())
    probs, selected = router.select(res, mode=mode, eta=eta, top_k=top_k, tau=tau)
    assert bool(torch.isfinite(probs).all())
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(batch), atol=1e-5, rtol=0)
    counts = selected.sum(dim=1)
    assert bool((counts >= 1).all())
    assert bool((counts <= (1 if mode == "top1" else min(top_k, tasks))).all())
    # the most likely task is always among the selected ones
    assert bool(selected.gather(1, probs.argmax(dim=1, keepdim=True)).all())


@SETTINGS
@given(m=dims, n=dims, fraction=st.floats(1e-3, 1.0))
def test_rank_for_is_in_range(m, n, fraction) -> None:
    k = rank_for((m, n), fraction)
    assert 1 <= k <= min(m, n)


def test_lowrank_roundtrip_dtype() -> None:
    lr = LowRank(torch.eye(3, 2, dtype=torch.float64), torch.tensor([2.0, 1.0], dtype=torch.float64),
                 torch.eye(4, 2, dtype=torch.float64))
    assert lr.to(torch.float32).reconstruct().dtype == torch.float32
