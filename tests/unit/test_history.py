"""The in-memory part of the load history: stream ids, age trimming, what Redis lacks."""

import pytest

from services.planner.history import LoadHistory, RecordLog, format_id, parse_id


def test_ids_strictly_increase_within_a_ms_and_when_time_goes_back():
    log = RecordLog(max_age_s=60)
    sids = [log.append(t, {"i": i}).sid for i, t in enumerate((10.0, 10.0, 10.0004, 10.001, 9.5, 11.0))]
    assert sids == [(10000, 0), (10000, 1), (10000, 2), (10001, 0), (10001, 1), (11000, 0)]
    assert [doc["i"] for _, doc in log.records()] == list(range(6))  # append order is kept


def test_reserve_puts_new_ids_after_what_redis_holds():
    log = RecordLog(max_age_s=60)
    log.reserve((20000, 3))
    assert log.append(20.0, {}).sid == (20000, 4)
    assert log.append(19.0, {}).sid == (20000, 5)


def test_trimmed_by_age_from_the_latest_time():
    log = RecordLog(max_age_s=10)
    for t in range(25):
        log.append(float(t), {"t": t})
    assert [t for t, _ in log.records()] == [float(t) for t in range(14, 25)]  # exactly max age old is kept
    log.advance(30.0)
    assert [t for t, _ in log.records()] == [20.0, 21.0, 22.0, 23.0, 24.0]


def test_after_is_what_redis_lacks():
    log = RecordLog(max_age_s=60)
    recs = [log.append(float(t), {}) for t in range(5)]
    assert log.after(None) == recs
    assert log.after(recs[2].sid) == recs[3:]
    assert log.after(recs[-1].sid) == []
    assert log.after((0, 0)) == recs  # Redis ends before all of memory


def test_docs_are_kept_as_json_reads_them_back():
    log = RecordLog(max_age_s=60)
    log.append(1.0, {"lens": (1, 2), "x": 0.5})
    assert log.records() == [(1.0, {"lens": [1, 2], "x": 0.5})]
    with pytest.raises(TypeError):
        log.append(2.0, {"bad": object()})


def test_id_text_round_trip():
    assert parse_id(format_id((1700000000123, 7))) == (1700000000123, 7)
    assert parse_id(b"5-0") == (5, 0)
    assert parse_id("") is None


async def test_without_redis_it_is_a_memory_history():
    hist = LoadHistory(None, "k", max_age_s=5)
    assert await hist.load(100.0) == []
    for t in range(100, 110):
        await hist.append(float(t), {"t": t})
    assert [t for t, _ in hist.records()] == [float(t) for t in range(104, 110)]
    assert not hist.redis_ok and not await hist.sync()
    await hist.close()
