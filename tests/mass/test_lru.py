"""The engine's one cache type: bounded, recency on hits, first writer wins, values made outside the lock."""

import threading

import pytest
import torch

from massmerge.mass.lru import LRU


def test_evicts_the_least_recently_used():
    cache: LRU[str, int] = LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert "b" not in cache and cache.peek("a") == 1 and cache.peek("c") == 3 and len(cache) == 2


def test_peek_does_not_touch_recency():
    cache: LRU[str, int] = LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.peek("a") == 1
    cache.put("c", 3)
    assert "a" not in cache and "b" in cache


def test_first_writer_wins():
    cache: LRU[str, list[int]] = LRU(4)
    first = cache.put("k", [1])
    assert cache.put("k", [2]) is first and cache.get_or_make("k", lambda: [3]) is first


def test_get_or_make_makes_once_per_miss_and_outside_the_lock():
    cache: LRU[int, int] = LRU(8)
    made = []

    def make() -> int:
        assert cache._lock.acquire(blocking=False), "make() ran while the cache's lock was held"
        cache._lock.release()
        made.append(1)
        return 7

    assert cache.get_or_make(0, make) == 7 and cache.get_or_make(0, make) == 7 and made == [1]


def test_threads_share_one_value():
    cache: LRU[int, object] = LRU(1)
    got: list[object] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        got.append(cache.get_or_make(0, object))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(value) for value in got}) == 1


def test_size_must_be_positive():
    with pytest.raises(ValueError, match="size 0"):
        LRU(0)


def test_a_byte_bound_evicts_the_least_recently_used_entries_but_keeps_the_last_one() -> None:
    cache: LRU[str, int] = LRU(10, max_bytes=100, weigh=lambda value: value)
    cache.put("a", 40)
    cache.put("b", 40)
    assert cache.get("a") == 40  # a is now the most recent
    cache.put("c", 40)  # 120 bytes: b, the least recent, goes
    assert "b" not in cache and "a" in cache and "c" in cache and cache.bytes == 80
    cache.put("big", 500)  # alone above the bound: everything else goes, the new entry stays
    assert list(cache._entries) == ["big"] and cache.bytes == 500
    cache.put("big", 7)  # already there: the first value and its weight stay
    assert cache.get("big") == 500 and cache.bytes == 500
    with pytest.raises(ValueError, match="both max_bytes and weigh"):
        LRU(2, max_bytes=10)


def test_the_set_caches_are_bounded_by_a_share_of_the_factors_bytes() -> None:
    from massmerge.lowrank import LowRank
    from massmerge.mass import ExpertFactors
    from massmerge.mass.setmerge import MIN_SET_CACHE_BYTES, SET_CACHE_FACTORS, SetMerger

    factors = ExpertFactors(task_names=["a", "b"], rank_fraction=0.5)
    factors.matrices["w"] = [LowRank(torch.ones(2048, 64), torch.ones(64), torch.ones(2048, 64)) for _ in range(2)]
    stored = 2 * (2 * 2048 * 64 + 64) * 4
    merger = SetMerger(factors)
    assert merger.cache_bytes == max(MIN_SET_CACHE_BYTES, int(SET_CACHE_FACTORS * stored))
    assert merger._cores.max_bytes == merger.cache_bytes
