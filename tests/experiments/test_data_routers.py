"""Routers that use data (experiments.data_routers) on toy cases whose answer is known."""

from __future__ import annotations

import pytest
import torch

from massmerge.experiments import data_routers as dr


def clusters(per_task: int, seed: int, spread: float = 0.3, dim: int = 6, tasks: int = 3):
    """Well-separated Gaussian clusters, one per task: any sensible router routes them perfectly."""
    gen = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.eye(dim)[:tasks]
    x = torch.cat([centers[t] + spread * torch.randn(per_task, dim, generator=gen) for t in range(tasks)])
    y = torch.arange(tasks).repeat_interleave(per_task)
    return x, y


@pytest.mark.parametrize("classifier", dr.CLASSIFIERS)
def test_separable_tasks_are_routed_perfectly(classifier: str) -> None:
    x, y = clusters(40, seed=0)
    test_x, test_y = clusters(30, seed=1)
    trained = dr.train_router(classifier, x, y, 3)
    assert trained.val_accuracy == 1.0
    assert bool((trained.predict(test_x) == test_y).all())


def test_knn_leave_one_out_leaves_each_point_out() -> None:
    """Pairs of duplicate points with opposite tasks: with itself left out, 1-NN always answers the twin's task."""
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 0, 1])
    loo = dr.knn_predict(x, y, x, 1, 2, leave_one_out=True)
    assert loo.tolist() == [1, 0, 1, 0]
    assert dr.knn_predict(x, y, torch.tensor([[0.9, 0.1]]), 1, 2).item() in (0, 1)


def test_knn_majority_and_nearest_tie_break() -> None:
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    y = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[0.8, 0.2]])
    assert dr.knn_predict(x, y, query, 3, 2).item() == 0  # two of the three nearest are task 0
    assert dr.knn_predict(x, y, query, 4, 2).item() == 0  # 2-2 tie: the nearest's task


def test_folds_partition_the_indices() -> None:
    parts = dr.folds(23)
    assert sorted(torch.cat(parts).tolist()) == list(range(23)) and len(parts) == dr.FOLDS
    assert [p.tolist() for p in parts] == [p.tolist() for p in dr.folds(23)]


def test_uninformative_features_route_at_chance_and_the_ceiling_picks_the_informative_set() -> None:
    x, y = clusters(50, seed=2)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    test_x, _ = clusters(30, seed=4)
    test_noise = torch.randn(test_x.shape, generator=torch.Generator().manual_seed(5))
    rows = dr.router_predictions({"noise": {"val": noise, "test": test_noise}, "signal": {"val": x, "test": test_x}},
                                 y, 3, classifiers=("kNN", "logistic"))
    noise_rows = [r for r in rows if r["features"] == "noise"]
    assert all(float(r["val_accuracy"]) < 0.6 for r in noise_rows)
    best = rows[dr.ceiling_of(rows)]
    assert best["features"] == "signal" and best["val_accuracy"] == 1.0
    assert {r["data"] for r in rows} == {dr.data_needed("kNN"), dr.data_needed("logistic")}


def test_ceiling_breaks_ties_by_order() -> None:
    rows = [{"val_accuracy": 0.5}, {"val_accuracy": 0.9}, {"val_accuracy": 0.9}]
    assert dr.ceiling_of(rows) == 1


def test_logistic_matches_a_hand_checkable_one_dimensional_case() -> None:
    """Two tasks on a line, split at 0: the boundary sits between the classes, so the sign decides."""
    x = torch.tensor([[-2.0], [-1.0], [-0.5], [0.5], [1.0], [2.0]])
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    predict = dr.fit_logistic(x, y, 2, 1e-3)
    assert predict(torch.tensor([[-0.2], [0.2], [-5.0], [5.0]])).tolist() == [0, 1, 0, 1]
