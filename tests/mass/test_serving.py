"""Serving a stream: windows routed first, second passes per task set; the same answers as one call per batch."""

from __future__ import annotations

import torch
from toy_mass import make_batch, make_parts

from massmerge.mass import MASSModel, mean_pool
from massmerge.mass.serving import FULL_GROUP_FRACTION, second_pass_batches, serve


def toy() -> MASSModel:
    base, factors, heads, cfg = make_parts(4)
    return MASSModel(base, factors, heads, cfg, pool=mean_pool())


def test_serve_gives_the_per_batch_answers_in_input_order():
    model = toy()
    ids = make_batch(40, seed=7)
    expected = model(ids, return_features=True)
    got = list(serve(model, list(ids), lambda rows: torch.stack(list(rows)), batch_size=8, window=24,
                     return_features=True))
    assert [p.index for p in got] == list(range(40))
    assert [p.task for p in got] == expected.task.tolist()
    assert [p.label for p in got] == expected.label.tolist()
    assert torch.equal(torch.stack([p.selected for p in got]), expected.selected)
    feats = torch.stack([p.features for p in got])
    assert float((feats - expected.features).norm() / expected.features.norm()) < 1e-5


def test_frequent_sets_get_batches_of_their_own_and_rare_ones_share():
    selected = torch.zeros(12, 4, dtype=torch.bool)
    selected[:7, 0] = True  # 7 samples of set (0,): a full group at batch size 8
    selected[7:9, 1] = True  # 2 of (1,)
    selected[9:, 2] = selected[9:, 3] = True  # 3 of (2, 3)
    order = list(reversed(range(12)))  # e.g. sorted by size
    batches = second_pass_batches(selected, order, batch_size=8)
    assert 7 >= FULL_GROUP_FRACTION * 8
    assert batches[0] == [6, 5, 4, 3, 2, 1, 0]  # the frequent set alone, in size order
    assert sorted(batches[1]) == list(range(7, 12)) and len(batches) == 2  # the rare sets mixed
    assert sorted(i for b in batches for i in b) == list(range(12))


def test_serve_sorts_by_size_within_a_window():
    model = toy()
    ids = list(make_batch(10, seed=1))
    seen: list[list[int]] = []

    def collate(rows):
        seen.append([int(r[0]) for r in rows])
        return torch.stack(list(rows))

    sizes = {int(r[0]): i for i, r in enumerate(ids)}
    list(serve(model, ids, collate, batch_size=4, size_of=lambda r: -sizes[int(r[0])]))
    first_batch = seen[0]  # the first pass batches follow the sizes (here: reversed input order)
    assert first_batch == [int(r[0]) for r in reversed(ids)][:4]


def test_window_grows_with_the_task_count():
    """At least WINDOW_BATCHES batches, and WINDOW_BATCHES_PER_TASK per task beyond that."""
    from massmerge.mass.serving import WINDOW_BATCHES, WINDOW_BATCHES_PER_TASK, window_batches

    assert window_batches(1) == WINDOW_BATCHES
    assert window_batches(8) == max(WINDOW_BATCHES, 8 * WINDOW_BATCHES_PER_TASK) == 32
    assert window_batches(20) == 80


def test_first_pass_batches_sort_by_size_within_windows():
    from massmerge.mass.serving import first_pass_batches, window_batches

    sizes = [5, 1, 4, 2, 3] * 20  # 100 inputs; T = 1: windows of 8 batches of 2 = 16 inputs
    batches = first_pass_batches(sizes, 2, 1)
    assert window_batches(1) * 2 == 16
    flat = [i for rows in batches for i in rows]
    assert sorted(flat) == list(range(100)) and all(len(rows) <= 2 for rows in batches)
    for start in range(0, 100, 16):  # each window holds its own inputs, smallest first
        window = flat[start:start + 16]
        assert sorted(window) == list(range(start, min(start + 16, 100)))
        assert [sizes[i] for i in window] == sorted(sizes[i] for i in window)


def test_a_deadline_flushes_a_slow_streams_window_before_it_is_full():
    """A server's stream: each input arrives late, so with ``deadline_ms`` each window holds what came in time
    (here one input: the first answer comes before the stream ends), and the answers stay the per-batch ones."""
    import time

    model = toy()
    ids = list(make_batch(6, seed=2))
    produced: list[int] = []

    def slow():
        for i, row in enumerate(ids):
            produced.append(i)
            time.sleep(0.03)
            yield row

    answers = []
    for prediction in serve(model, slow(), lambda rows: torch.stack(list(rows)), batch_size=4, window=64,
                            deadline_ms=20):
        answers.append((prediction.index, len(produced)))
    assert [index for index, _ in answers] == list(range(6))
    assert answers[0][1] < len(ids)  # answered before the stream ended: the window did not wait to fill
    waited = [p.index for p in serve(model, iter(ids), lambda rows: torch.stack(list(rows)), batch_size=4,
                                          window=64)]
    assert waited == list(range(6))
    expected = model(torch.stack(ids))
    got = list(serve(model, slow(), lambda rows: torch.stack(list(rows)), batch_size=4, window=64, deadline_ms=20))
    assert [p.task for p in got] == expected.task.tolist() and [p.label for p in got] == expected.label.tolist()
