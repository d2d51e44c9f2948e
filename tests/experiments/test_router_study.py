"""The router study's scoring (experiments.router_study) on per-input vectors whose answer is known."""

from __future__ import annotations

import pytest
import torch

from massmerge.experiments.pool import TaskPool, TaskSplit
from massmerge.experiments.router_study import hard_row, loss_split, per_task, task_ids


def toy_pool(sizes: tuple[int, ...] = (4, 2)) -> TaskPool:
    splits = {split: [TaskSplit.of_lists(torch.zeros(n, dtype=torch.long), [], []) for n in sizes]
              for split in ("test", "val")}
    return TaskPool([f"t{i}" for i in range(len(sizes))], [torch.nn.Identity()] * len(sizes), splits,
                    collate=list, features=lambda model, batch: batch)


def test_task_ids_and_per_task_means_follow_task_order() -> None:
    pool = toy_pool()
    assert task_ids(pool, "test").tolist() == [0, 0, 0, 0, 1, 1]
    assert per_task(pool, torch.tensor([1, 1, 0, 0, 1, 0])) == {"t0": 0.5, "t1": 0.5}


def test_a_hard_router_counts_an_input_only_with_the_right_task_and_a_right_answer() -> None:
    pool = toy_pool()
    given = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool)  # task-given MASS right on these
    picks = [0, 1, 0, 0, 1, 0]  # wrong task on input 1 (t0) and input 5 (t1)
    row = hard_row(pool, "r", picks, given, {"t0": 0.5, "t1": 1.0}, data="none")
    assert row["routing_accuracy"] == {"t0": 0.75, "t1": 0.5}
    assert row["accuracy"] == {"t0": 0.5, "t1": 0.5}  # t0: inputs 0 and 2; input 3 routed right but answered wrong
    assert row["normalized"] == {"t0": 1.0, "t1": 0.5} and row["avg_normalized"] == pytest.approx(0.75)


def test_loss_split_separates_what_the_best_router_also_loses() -> None:
    pool = toy_pool()
    given = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    hidden = torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool)  # MASS loses inputs 1, 2 (t0) and 4 (t1)
    best = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)  # the best data router gets 1 and 4 right, not 2
    split = loss_split(pool, given, hidden, best)
    assert split["t0"] == {"task_given": 1.0, "task_hidden": 0.5, "lost": 0.5, "lost_by_best_router_too": 0.25,
                           "lost_only_without_data": 0.25}
    assert split["t1"]["lost"] == 0.5 and split["t1"]["lost_only_without_data"] == 0.5
    for row in split.values():
        assert row["lost"] == pytest.approx(row["lost_by_best_router_too"] + row["lost_only_without_data"])
