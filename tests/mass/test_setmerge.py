"""TSV-M of task sets from stored factors (Gram matrices + small eigendecompositions), against float64 SVD polar
factors computed independently here, and the rank-deficient case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from massmerge.lowrank import LowRank
from massmerge.mass import ExpertFactors
from massmerge.mass.setmerge import SetMerger, Stacked, inverse_sqrt


def svd_polar(a: np.ndarray) -> np.ndarray:
    p, _, qh = np.linalg.svd(a, full_matrices=False)
    return p @ qh


def random_factors(rng: np.random.Generator, m: int, n: int, k: int, dtype: torch.dtype) -> LowRank:
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    s = np.sort(rng.uniform(0.1, 2.0, k))[::-1].copy()
    return LowRank(*(torch.from_numpy(x).to(dtype) for x in (u, s, v)))


def reference_delta(factors: list[LowRank], tasks: tuple[int, ...]) -> np.ndarray:
    """TSV-M from float64 numpy SVDs of the stacked bases: polar(U) diag(s) polar(V)^T."""
    U = np.concatenate([factors[t].U.double().numpy() for t in tasks], axis=1)
    V = np.concatenate([factors[t].V.double().numpy() for t in tasks], axis=1)
    s = np.concatenate([factors[t].s.double().numpy() for t in tasks])
    return svd_polar(U) @ np.diag(s) @ svd_polar(V).T


def merger_of(per_task: list[LowRank]) -> SetMerger:
    names = [f"t{i}" for i in range(len(per_task))]
    factors = ExpertFactors(task_names=names, rank_fraction=0.25, matrices={"w": list(per_task)})
    factors.apply_deredundancy(None)
    return SetMerger(factors)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (300, 16)])
def test_set_delta_matches_svd_polar(dtype, tol, shape):
    rng = np.random.default_rng(0)
    m, n = shape
    per_task = [random_factors(rng, m, n, 4, dtype) for _ in range(4)]
    merger = merger_of(per_task)
    for tasks in [(0,), (1, 3), (0, 1, 2), (0, 1, 2, 3)]:
        expected = reference_delta(per_task, tasks)
        got = merger.dense_delta("w", tasks).double().numpy()
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < tol, tasks


def test_polar_factor_itself_agrees_to_1e4_with_exact_svd():
    """The implied polar factor U_S G_U^{-1/2} equals P Q^T of the exact float64 SVD (design.md: 1e-4)."""
    rng = np.random.default_rng(1)
    U = torch.from_numpy(np.concatenate([np.linalg.qr(rng.standard_normal((64, 6)))[0] for _ in range(3)], axis=1))
    for dtype in (torch.float32, torch.float64):
        A = U.to(dtype)
        implied = (A.double() @ inverse_sqrt(A.double().T @ A.double())).numpy()
        exact = svd_polar(A.double().numpy())
        assert np.linalg.norm(implied - exact) / np.linalg.norm(exact) < 1e-4


def test_one_task_is_its_rank_k_reconstruction():
    rng = np.random.default_rng(2)
    per_task = [random_factors(rng, 30, 20, 5, torch.float64) for _ in range(3)]
    merger = merger_of(per_task)
    for t in range(3):
        assert torch.allclose(merger.dense_delta("w", (t,)), per_task[t].reconstruct(), atol=1e-12)


def test_rank_deficient_stack_keeps_the_shared_direction_once():
    """Two tasks with the same direction: the stack loses column rank; the merge is the polar factor on the
    stack's range (a partial isometry), so the shared direction carries the mean of the two values."""
    u, v = torch.zeros(5, 1, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64)
    u[0, 0], v[1, 0] = 1.0, 1.0
    per_task = [LowRank(u, torch.tensor([2.0], dtype=torch.float64), v),
                LowRank(u.clone(), torch.tensor([4.0], dtype=torch.float64), v.clone())]
    delta = merger_of(per_task).dense_delta("w", (0, 1))
    expected = torch.zeros(5, 4, dtype=torch.float64)
    expected[0, 1] = 3.0
    assert torch.allclose(delta, expected, atol=1e-12)


def test_cores_are_cached_per_set_and_tasks_keep_views():
    rng = np.random.default_rng(3)
    per_task = [random_factors(rng, 12, 10, 3, torch.float32) for _ in range(3)]
    merger = merger_of(per_task)
    assert merger.cores((0, 2)) is merger.cores((0, 2))
    stacked = merger.stacked["w"]
    assert stacked.Ut.shape == (9, 12) and stacked.offsets == (0, 3, 6, 9)
    view = merger.factors.matrices["w"][1]
    assert view.U.data_ptr() == stacked.Ut[3:6].data_ptr()  # stored once: the per-task factors are views


def test_empty_rank_matrix_merges_to_zero():
    empty = LowRank(torch.zeros(6, 0), torch.zeros(0), torch.zeros(5, 0))
    stacked = Stacked.of([empty, empty])
    assert stacked.rows((0, 1)).numel() == 0
    assert torch.equal(merger_of([empty, empty]).dense_delta("w", (0, 1)), torch.zeros(6, 5))
