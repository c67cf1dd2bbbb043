"""The decode queue: first come first served, bounded, each wait bounded by its budget."""

from __future__ import annotations

import asyncio

import pytest

from common.errors import ResourceExhausted
from services.gateway.decode_queue import DecodeQueue


class Pool:
    """Seats that requests take and give back; a try that finds none answers None."""

    def __init__(self, seats: int, queue: DecodeQueue) -> None:
        self.free, self.queue, self.order = seats, queue, []

    def take(self, name: str):
        async def attempt():
            if self.free == 0:
                return None
            self.free -= 1
            self.order.append(name)
            return name
        return attempt

    def give_back(self) -> None:
        self.free += 1
        self.queue.freed()


async def test_waiters_are_served_in_arrival_order_as_seats_free():
    queue = DecodeQueue(limit=10, poll_s=5.0)  # only freed() wakes them: the order is the queue's
    pool = Pool(0, queue)
    waiters = []
    for name in "abcd":
        waiters.append(asyncio.create_task(queue.wait_for(pool.take(name), 10.0, "full")))
        await asyncio.sleep(0.01)
    assert len(queue) == 4
    for _ in range(4):
        pool.give_back()
        await asyncio.sleep(0.05)
    assert [await w for w in waiters] == list("abcd") and pool.order == list("abcd")
    assert len(queue) == 0


async def test_a_full_queue_refuses_at_once_and_a_spent_budget_gives_up():
    queue = DecodeQueue(limit=1, poll_s=0.01)
    pool = Pool(0, queue)
    first = asyncio.create_task(queue.wait_for(pool.take("a"), 0.2, "no KV"))
    await asyncio.sleep(0.02)
    with pytest.raises(ResourceExhausted, match="1 requests already wait"):
        await queue.wait_for(pool.take("b"), 5.0, "no KV")
    with pytest.raises(ResourceExhausted, match=r"within 0.20 s in the queue; no KV"):
        await first
    assert len(queue) == 0


async def test_a_cancelled_head_hands_over_to_the_next():
    queue = DecodeQueue(limit=5, poll_s=5.0)
    pool = Pool(0, queue)
    head = asyncio.create_task(queue.wait_for(pool.take("a"), 10.0, "full"))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(queue.wait_for(pool.take("b"), 10.0, "full"))
    await asyncio.sleep(0.01)
    pool.free = 1  # room, but nobody told the queue: only the head's leaving wakes the next
    head.cancel()
    assert await asyncio.wait_for(second, 1.0) == "b"
    assert len(queue) == 0


def test_a_negative_limit_is_refused():
    with pytest.raises(ValueError):
        DecodeQueue(limit=-1)
