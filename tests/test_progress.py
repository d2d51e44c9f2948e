"""progress.listen: observers of tracked stages see the start and every item, with progress shown or not."""

from __future__ import annotations

from massmerge import progress


def test_listeners_see_the_start_and_every_item_in_order() -> None:
    heard: list[tuple[str, int, int | None]] = []
    with progress.listen(lambda stage, done, total: heard.append((stage, done, total))):
        assert list(progress.track(iter("abc"), "letters", total=3)) == ["a", "b", "c"]
        assert list(progress.track([1, 2], "numbers")) == [1, 2]
    assert heard == [("letters", 0, 3), ("letters", 1, 3), ("letters", 2, 3), ("letters", 3, 3),
                     ("numbers", 0, 2), ("numbers", 1, 2), ("numbers", 2, 2)]
    assert list(progress.track([1], "after the block")) == [1] and len(heard) == 7


def test_a_listener_is_called_after_the_consumer_is_done_with_the_item() -> None:
    """What a listener measures (memory after an expert, say) includes the work done on that item."""
    done_work, seen = [], []
    with progress.listen(lambda stage, done, total: seen.append(list(done_work))):
        for item in progress.track(["x", "y"], "work"):
            done_work.append(item)
    assert seen == [[], ["x"], ["x", "y"]]
