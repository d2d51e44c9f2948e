"""Evaluation figures on hand-made numbers whose answers are known."""

from __future__ import annotations

import pytest
import torch

from massmerge.experiments import metrics as ev
from massmerge.heads import ZeroShotHead


def test_accuracy_and_normalized_use_the_same_split() -> None:
    assert ev.accuracy(torch.tensor([1, 2, 3, 0]), torch.tensor([1, 2, 0, 0])) == 0.75
    norm = ev.normalized_accuracy({"a": 0.45, "b": 0.5}, {"a": 0.9, "b": 0.0})
    assert norm == {"a": 0.5}  # a task whose expert scores 0 cannot be normalized
    assert ev.mean(norm) == 0.5 and ev.mean({"x": 1.0, "y": 0.0}) == 0.5


def _heads() -> list[ZeroShotHead]:
    return [ZeroShotHead(torch.eye(4)[:2], 10.0), ZeroShotHead(torch.eye(4)[2:], 10.0)]


def test_max_logit_counts_only_right_task_and_class() -> None:
    feats = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0], [0, 1.0, 0, 0]])
    task, label = ev.max_logit_predictions(feats, _heads())
    assert task.tolist() == [0, 1, 0] and label.tolist() == [0, 1, 1]
    # samples of task 0 labelled 0, 1, 1: the second went to task 1 (wrong task), so 2 of 3 are right
    assert ev.max_logit_accuracy(feats, _heads(), 0, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert ev.oracle_head_accuracy(feats, _heads()[0], torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_routing_confusion_rows_are_true_tasks() -> None:
    conf = ev.routing_confusion(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 1, 1, 0]), 2)
    assert conf.tolist() == [[1, 1], [1, 2]]
    assert ev.routing_accuracy_per_task(conf) == pytest.approx([0.5, 2 / 3])


def test_selection_recall() -> None:
    selected = torch.tensor([[True, False], [True, True], [False, True]])
    assert ev.selection_recall(torch.tensor([0, 0, 0]), selected) == pytest.approx(2 / 3)


def test_storage_and_throughput() -> None:
    assert ev.storage_factor(200, 100) == 2.0
    assert ev.throughput(lambda: sum(range(1000)), 10) > 0
