"""The task-scaling sampler's seeds and the summary across subsets (experiments.scaling)."""

from __future__ import annotations

import math

import pytest

from massmerge.experiments.scaling import interval_over, summarize, task_subsets


def test_subsets_are_seeded_distinct_and_of_the_right_size() -> None:
    subsets = task_subsets(16)
    assert subsets == task_subsets(16)  # same seed, same subsets
    by_size: dict[int, list[tuple[int, ...]]] = {}
    for size, subset in subsets:
        assert len(subset) == size and list(subset) == sorted(set(subset)) and max(subset) < 16
        by_size.setdefault(size, []).append(subset)
    assert {size: len(found) for size, found in by_size.items()} == {2: 3, 4: 3, 8: 3, 12: 3, 16: 1}
    assert all(len(set(found)) == len(found) for found in by_size.values())


def test_other_seeds_draw_other_subsets_and_sizes_do_not_disturb_each_other() -> None:
    assert task_subsets(16, seed=0) != task_subsets(16, seed=1)
    alone = task_subsets(16, sizes=(4,))
    assert alone == [s for s in task_subsets(16) if s[0] == 4]


def test_sizes_above_the_pool_are_left_out_and_small_pools_give_what_they_have() -> None:
    assert {size for size, _ in task_subsets(5)} == {2, 4}
    assert len([s for s in task_subsets(3, sizes=(2,), draws=5)]) == math.comb(3, 2)


def test_interval_across_subsets_by_hand() -> None:
    low, high = interval_over([0.8, 0.9, 1.0])
    half = 4.303 * 0.1 / math.sqrt(3)  # t(0.975, 2) x sd / sqrt(n)
    assert (low, high) == pytest.approx((0.9 - half, 0.9 + half))
    assert interval_over([0.7], single=(0.6, 0.8)) == (0.6, 0.8)


def test_summary_per_method_and_size() -> None:
    points = [{"T": 2, "tasks": ["a", "b"], "avg_normalized": {"MASS": 0.9, "tsv_m": 0.8},
               "intervals": {"MASS": (0.85, 0.95), "tsv_m": (0.7, 0.9)}},
              {"T": 2, "tasks": ["a", "c"], "avg_normalized": {"MASS": 1.0, "tsv_m": 0.6},
               "intervals": {"MASS": (0.9, 1.1), "tsv_m": (0.5, 0.7)}},
              {"T": 3, "tasks": ["a", "b", "c"], "avg_normalized": {"MASS": 0.95},
               "intervals": {"MASS": (0.9, 1.0)}}]
    rows = {(r["method"], r["T"]): r for r in summarize(points, ("MASS", "tsv_m"))}
    assert set(rows) == {("MASS", 2), ("MASS", 3), ("tsv_m", 2)}
    assert rows[("MASS", 2)]["mean"] == pytest.approx(0.95) and rows[("MASS", 2)]["values"] == [0.9, 1.0]
    assert rows[("MASS", 3)]["interval"] == [0.9, 1.0]  # one subset: its own interval
    half = 12.706 * math.sqrt(0.02) / math.sqrt(2)
    assert rows[("tsv_m", 2)]["interval"] == pytest.approx([0.7 - half, 0.7 + half])
