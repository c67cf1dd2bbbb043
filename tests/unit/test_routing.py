from services.gateway.routing import WorkerView, decode_preference, pick_prefill


def w(worker_id: str, free: int = 100, block_size: int = 16) -> WorkerView:
    return WorkerView(worker_id, f"{worker_id}:1", free, block_size)


def ids(workers: list[WorkerView]) -> list[str]:
    return [x.worker_id for x in workers]


def test_pick_prefill_least_outstanding_tokens():
    workers = [w("a"), w("b"), w("c")]
    assert pick_prefill(workers, {"a": 500, "b": 20, "c": 300}).worker_id == "b"
    assert pick_prefill(workers, {"a": 500, "b": 20}).worker_id == "c"  # missing means 0
    assert pick_prefill(workers, {}).worker_id == "a"  # tie: by id
    assert pick_prefill([w("z"), w("y")], {}).worker_id == "y"
    assert pick_prefill([], {"a": 1}) is None


def test_decode_preference_outstanding_then_most_free():
    workers = [w("a", free=10), w("b", free=50), w("c", free=30), w("d", free=30)]
    assert ids(decode_preference(workers, {"a": 1, "b": 2}, tokens_needed=16)) == ["c", "d", "a", "b"]
    assert ids(decode_preference(workers, {}, tokens_needed=16)) == ["b", "c", "d", "a"]


def test_decode_preference_short_on_blocks_goes_last():
    workers = [w("busy", free=100), w("short", free=2), w("exact", free=4), w("short2", free=3)]
    # 64 tokens need 4 blocks of 16: "exact" fits; the short ones go last even when idle, most free first
    order = ids(decode_preference(workers, {"busy": 5}, tokens_needed=64))
    assert order == ["exact", "busy", "short2", "short"]
    order = ids(decode_preference(workers, {"short2": 1}, tokens_needed=64))
    assert order == ["busy", "exact", "short", "short2"]  # among the short: outstanding before free blocks
    assert decode_preference([], {}, 1) == []


def test_decode_preference_block_size_matters():
    workers = [w("small", free=10, block_size=4), w("big", free=10, block_size=32)]
    assert ids(decode_preference(workers, {"big": 3}, tokens_needed=100)) == ["big", "small"]
    assert ids(decode_preference(workers, {"big": 3}, tokens_needed=40)) == ["small", "big"]
