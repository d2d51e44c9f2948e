"""Accuracy figures of every experiment: absolute, normalized, max-logit (task hidden), routing, storage and speed.

Why these definitions: normalized accuracy divides by the expert's accuracy on the *same* test split (never a
number from elsewhere), and a max-logit prediction counts as correct only when both the task and the class are
right, because the user gets a (task, class) answer and a right class index in the wrong label space is wrong.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from massmerge.heads.rules import select_by_max_logit


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of equal entries (0.0 for an empty split, which the suite never makes)."""
    if target.numel() == 0:
        return 0.0
    return float((pred.long() == target.long()).float().mean())


def normalized_accuracy(acc: Mapping[str, float], expert_acc: Mapping[str, float]) -> dict[str, float]:
    """Per task ``acc / expert_acc`` on the same test split (tasks whose expert scores 0 are left out)."""
    return {task: acc[task] / expert_acc[task] for task in acc if expert_acc.get(task, 0.0) > 0}


def mean(values: Mapping[str, float] | Sequence[float]) -> float:
    """Unweighted mean over tasks (each task counts once whatever its test size)."""
    items = list(values.values()) if isinstance(values, Mapping) else list(values)
    return sum(items) / len(items) if items else 0.0


def logits(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """A head's logits of ``features`` on the CPU, wherever the head lives (a served model moves its heads to
    its device)."""
    weight = next(iter(head.buffers()), None)
    device = weight.device if weight is not None else features.device
    with torch.no_grad():
        return head(features.to(device)).float().cpu()


def oracle_head_accuracy(features: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> float:
    """Accuracy with the true task's head (the task given)."""
    return accuracy(logits(head, features).argmax(-1), labels)


def max_logit_predictions(features: torch.Tensor, heads: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """(task [B], class [B]) when every task's head competes and the largest best logit wins (task hidden)."""
    return select_by_max_logit([logits(head, features) for head in heads])


def max_logit_accuracy(features: torch.Tensor, heads: Sequence[nn.Module], task: int, labels: torch.Tensor) -> float:
    """Accuracy of the max-logit head on samples of ``task``: right task and right class."""
    pred_task, pred_label = max_logit_predictions(features, heads)
    return accuracy((pred_task == task) & (pred_label == labels), torch.ones_like(labels, dtype=torch.bool))


def routing_confusion(true_task: torch.Tensor, pred_task: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """[T, T] counts: row = true task, column = task the router ranked first."""
    index = true_task.long() * num_tasks + pred_task.long()
    return torch.bincount(index, minlength=num_tasks * num_tasks).view(num_tasks, num_tasks)


def routing_accuracy_per_task(confusion: torch.Tensor) -> list[float]:
    """Per true task, the fraction routed first to itself (the confusion matrix's diagonal over row sums)."""
    rows = confusion.sum(1).clamp_min(1)
    return (confusion.diag().float() / rows.float()).tolist()


def selection_recall(true_task: torch.Tensor, selected: torch.Tensor) -> float:
    """Fraction of samples whose true task is in the selected set S (what the second pass can still fix)."""
    return float(selected[torch.arange(len(true_task)), true_task.long()].float().mean())


def storage_factor(stored_numel: int, base_numel: int) -> float:
    """Numbers a method keeps over the base model's numbers (1.0 = one model; T + 1 = base plus every expert)."""
    return stored_numel / base_numel


def throughput(fn: Callable[[], object], n_items: int, *, repeats: int = 2) -> float:
    """Items per second of ``fn`` (best of ``repeats`` timed runs after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n_items / best if best > 0 else float("inf")
