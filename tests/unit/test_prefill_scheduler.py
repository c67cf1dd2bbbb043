import pytest

from services.prefill.scheduler import PrefillScheduler


def test_rejects_non_positive_budget():
    with pytest.raises(ValueError):
        PrefillScheduler(0)


def test_batches_under_token_budget_fifo():
    s = PrefillScheduler[str](token_budget=100)
    for job, n in [("a", 40), ("b", 50), ("c", 20), ("d", 10)]:
        s.add(job, n)
    assert s.num_waiting == 4 and s.tokens_waiting == 120
    assert s.schedule() == ["a", "b"]  # c would make 110
    assert s.schedule() == ["c", "d"]
    assert s.schedule() == []
    assert s.num_waiting == 0 and s.tokens_waiting == 0


def test_exact_budget_fits():
    s = PrefillScheduler[str](100)
    s.add("a", 60)
    s.add("b", 40)
    assert s.schedule() == ["a", "b"]


def test_over_budget_prompt_runs_alone():
    s = PrefillScheduler[str](100)
    s.add("small", 10)
    s.add("huge", 500)
    s.add("after", 10)
    assert s.schedule() == ["small"]
    assert s.schedule() == ["huge"]
    assert s.schedule() == ["after"]


def test_fifo_is_kept_no_skipping_ahead():
    s = PrefillScheduler[str](100)
    s.add("a", 90)
    s.add("b", 20)
    s.add("c", 5)  # would fit next to a, but must not jump ahead of b
    assert s.schedule() == ["a"]
    assert s.schedule() == ["b", "c"]


def test_remove():
    s = PrefillScheduler[str](100)
    s.add("a", 10)
    s.add("b", 10)
    s.add("c", 10)
    assert s.remove("b") is True
    assert s.remove("b") is False
    assert s.remove("zzz") is False
    assert s.tokens_waiting == 20
    assert s.schedule() == ["a", "c"]


def test_remove_is_by_identity():
    s = PrefillScheduler[object](100)
    a, b = object(), object()
    s.add(a, 10)
    s.add(b, 10)
    assert s.remove(b)
    assert s.schedule() == [a]


def test_remove_equal_but_distinct_jobs_removes_the_right_one():
    s = PrefillScheduler[list](100)
    first, second = [1], [1]  # equal, not identical
    s.add(first, 10)
    s.add(second, 10)
    assert s.remove(second)
    batch = s.schedule()
    assert len(batch) == 1 and batch[0] is first
