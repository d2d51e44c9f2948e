"""The served MASS pass consumes its test items as a stream (issue 27, item 3): the inputs alive at once stay
within serve's window whatever the test-set size, and the scores equal those of the same items held in lists."""

from __future__ import annotations

import weakref

import torch
from toy_mass import LENGTH, VOCAB, make_model

from massmerge.experiments import runner
from massmerge.experiments.pool import TaskPool, TaskSplit
from massmerge.mass.serving import window_batches

TASKS, PER_TASK, BATCH = 4, 100, 8


def _labels(t: int) -> torch.Tensor:
    return torch.randint(0, 5, (PER_TASK,), generator=torch.Generator().manual_seed(t))


def _inputs(t: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (PER_TASK, LENGTH), generator=torch.Generator().manual_seed(100 + t))


def _pool(model, splits: list[TaskSplit]) -> TaskPool:
    return TaskPool([f"task{t}" for t in range(TASKS)], model.heads, {"test": splits}, torch.stack,
                    lambda m, batch: m(batch))


def test_score_mass_holds_at_most_a_window_of_inputs() -> None:
    model = make_model(TASKS).with_settings(batch_size=BATCH)
    alive, peak = [0], [0]

    def released() -> None:
        alive[0] -= 1

    def stream(t: int):
        for row in _inputs(t):
            item = row.clone()
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            weakref.finalize(item, released)
            yield item
            del item

    streamed = [TaskSplit(_labels(t), batches=list, items=lambda t=t: stream(t)) for t in range(TASKS)]
    result = runner.score_mass(_pool(model, streamed), model)
    window = window_batches(TASKS) * BATCH
    assert TASKS * PER_TASK > 3 * window  # the test set is several windows long
    assert peak[0] <= window + 1, (peak[0], window)

    held = [TaskSplit.of_lists(_labels(t), [], list(_inputs(t))) for t in range(TASKS)]
    reference = runner.score_mass(_pool(model, held), model)
    for key in ("max_logit", "oracle_head", "routing_accuracy", "selection_recall", "task_choice", "correct",
                "confusion", "mean_selected", "task_sets"):
        assert result[key] == reference[key], key


def test_mixed_inputs_picks_the_same_inputs_from_a_stream() -> None:
    model = make_model(TASKS)
    splits = [TaskSplit(_labels(t), batches=list, items=lambda t=t: iter(_inputs(t))) for t in range(TASKS)]
    items, _ = runner.mixed_inputs(_pool(model, splits), 50, BATCH)
    import random

    everything = [row for t in range(TASKS) for row in _inputs(t)]
    random.Random(0).shuffle(everything)  # what mixed_inputs did on a list of every input
    assert all(torch.equal(a, b) for a, b in zip(items, everything[:50], strict=True))
