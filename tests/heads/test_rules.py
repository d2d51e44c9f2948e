"""Head rules on hand-checkable logits: max-logit (the paper), posterior and joint, among the allowed tasks."""

from __future__ import annotations

import math

import pytest
import torch

from massmerge.heads import choose, select_by_max_logit

# one sample, three tasks: task 0 has 4 classes with a flat-ish best logit, task 1 two classes, task 2 three
LOGITS = [torch.tensor([[3.0, 2.9, 2.8, 2.7]]), torch.tensor([[2.5, 0.0]]), torch.tensor([[1.0, 4.0, 0.0]])]
ALL = torch.tensor([[True, True, True]])


def test_max_logit_picks_the_largest_best_logit_among_the_allowed():
    assert choose(LOGITS, ALL) == (torch.tensor([2]), torch.tensor([1]))
    no_task_2 = torch.tensor([[True, True, False]])
    task, label = choose(LOGITS, no_task_2)
    assert (int(task), int(label)) == (0, 0)
    assert select_by_max_logit(LOGITS[:2]) == (torch.tensor([0]), torch.tensor([0]))


PROBS = torch.tensor([[0.45, 0.45, 0.10]])  # the router cannot tell task 0 from task 1


def test_posterior_adds_the_log_router_probability_to_the_log_softmax():
    probs = PROBS
    task, label = choose(LOGITS, ALL, rule="posterior", probs=probs)
    scores = []
    for t, logits in enumerate(LOGITS):
        log_softmax = logits[0] - torch.logsumexp(logits[0], 0)
        scores.append(math.log(probs[0, t]) + float(log_softmax.max()))
    assert int(task) == max(range(3), key=scores.__getitem__) == 1  # the 2-class head's softmax is surer
    assert int(label) == 0


def test_joint_adds_the_log_router_probability_to_the_raw_logits():
    probs = PROBS
    task, label = choose(LOGITS, ALL, rule="joint", probs=probs)
    scores = [math.log(probs[0, t]) + float(logits.max()) for t, logits in enumerate(LOGITS)]
    assert int(task) == max(range(3), key=scores.__getitem__) == 0  # neither the raw max (2) nor the softmax (1)
    assert int(label) == 0
    sure_of_task_2 = torch.tensor([[0.05, 0.05, 0.90]])
    assert int(choose(LOGITS, ALL, rule="joint", probs=sure_of_task_2)[0]) == 2


@pytest.mark.parametrize("rule", ["posterior", "joint"])
def test_rules_that_read_the_router_need_its_probabilities(rule):
    with pytest.raises(ValueError, match="probabilities"):
        choose(LOGITS, ALL, rule=rule)


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown head rule"):
        choose(LOGITS, ALL, rule="vote", probs=torch.ones(1, 3) / 3)
