"""The gateway's short-prompt gate (services/gateway/short_gate.py): held prompts leave together,
to one prefill worker, when a worker frees, at the token cap, or at the wait cap; a cancelled one
leaves the batch."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.gateway.short_gate import ShortGate


async def test_held_prompts_leave_together_when_a_worker_frees_or_a_cap_is_reached():
    gate = ShortGate(lambda: "prefill-1", time.monotonic)
    gate.set_caps(token_cap=100, wait_cap_s=10.0)
    a, b = asyncio.create_task(gate.hold(30)), asyncio.create_task(gate.hold(30))
    await asyncio.sleep(0.01)
    assert len(gate) == 2 and not a.done()
    gate.worker_freed()
    assert await a == "prefill-1" and await b == "prefill-1" and len(gate) == 0
    c = asyncio.create_task(gate.hold(60))
    await asyncio.sleep(0.01)
    # A prompt that would take the held ones past the cap (60 + 50 > 100) sends them, and starts
    # the next batch itself: it is held until a worker frees (or its wait cap, 10 s, ends).
    d = asyncio.create_task(gate.hold(50))
    assert await c == "prefill-1"
    await asyncio.sleep(0.01)
    assert not d.done() and len(gate) == 1
    gate.worker_freed()
    assert await d == "prefill-1" and len(gate) == 0
    # One that fills the batch exactly goes with it at once.
    e = asyncio.create_task(gate.hold(40))
    await asyncio.sleep(0.01)
    assert await gate.hold(60) == "prefill-1" and await e == "prefill-1"


async def test_the_wait_cap_releases_in_wall_seconds_and_a_cancelled_prompt_leaves():
    gate = ShortGate(lambda: None, time.monotonic, seconds_per_profile_second=2.0)
    gate.set_caps(token_cap=1000, wait_cap_s=0.05)  # 0.1 s of wall time at time scale 2
    gone = asyncio.create_task(gate.hold(10))
    await asyncio.sleep(0.01)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert len(gate) == 0
    started = time.monotonic()
    assert await asyncio.wait_for(gate.hold(10), 2.0) is None
    assert 0.08 <= time.monotonic() - started < 1.0
