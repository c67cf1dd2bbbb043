"""An in-place role switch of one worker: no restart, no weight reload (both engines live in the
worker from the start; the role only says which takes work).

    prefill -> decode   refuse new prompts, finish those accepted (their KV is handed off), switch
    prefill -> mixed
    decode -> prefill   refuse new reservations, live-migrate every request held to the other
    mixed -> prefill    decode (or mixed) workers (services/decode/migration.py), then switch.
                        Requests still waiting for their KV, or for their last chunk here, are
                        moved as soon as it is in. A request that no other worker has room for is
                        finished here instead (drain fallback, said in the result)
    decode <-> mixed    at once: the requests held stay; a mixed worker takes prompts of its own
                        (DecodeRequest.prompt_token_ids) at its chunk budget, a decode worker's
                        queued prompts are still prefilled here

The worker never switches away the last serving worker that decodes, nor the last prefill worker
to decode while no mixed worker prefills for itself (FAILED_PRECONDITION).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from common.errors import FailedPrecondition
from common.types import Role
from services.decode.migration import MoveResult, Target
from services.decode.migration_plan import movable

log = logging.getLogger(__name__)
POLL_S = 0.005


@dataclass
class SwitchResult:
    from_role: Role
    to_role: Role
    total_seconds: float = 0.0
    drain_seconds: float = 0.0
    migration_seconds: float = 0.0
    moves: list[MoveResult] = field(default_factory=list)
    drained_requests: int = 0
    note: str = ""

    @property
    def migrated(self) -> list[MoveResult]:
        return [m for m in self.moves if m.moved_to]

    @property
    def fell_back_to_drain(self) -> bool:
        return self.drained_requests > 0


async def switch_role(rt, to: Role) -> SwitchResult:
    """`rt` is the WorkerRuntime. Raises FailedPrecondition when the switch is not allowed."""
    started = time.perf_counter()
    from_role = rt.state.role
    topology = await rt.fetch_topology()
    serving = [w for w in topology if w.worker_id != rt.worker_id and w.role is not None and w.serving
               and not w.switching]
    peers = [w for w in serving if w.role.decodes]  # where this worker's requests may move
    if to != from_role:
        if from_role.decodes and to is Role.PREFILL and not peers:
            raise FailedPrecondition(f"{rt.worker_id} is the last worker that decodes; it keeps its role")
        if from_role is Role.PREFILL and to is Role.DECODE and not any(
                w.role in (Role.PREFILL, Role.MIXED) for w in serving):
            raise FailedPrecondition(f"{rt.worker_id} is the last prefill worker serving; it keeps its role")
    rt.state.begin_switch(to)
    rt.on_state_change()
    result = SwitchResult(from_role, to)
    try:
        if from_role == Role.PREFILL:
            t0 = time.perf_counter()
            while rt.prefill.busy:
                await asyncio.sleep(POLL_S)
            result.drain_seconds = time.perf_counter() - t0
        elif to is not Role.PREFILL:
            pass  # decode <-> mixed: nothing to drain or move
        else:
            targets = [Target(w.worker_id, w.address, w.kv_free_blocks) for w in peers]
            await _empty_decode(rt, targets, result)
        rt.state.finish_switch()
    except BaseException:
        rt.state.abort_switch()
        rt.on_state_change()
        raise
    rt.on_state_change()
    result.total_seconds = time.perf_counter() - started
    # The planner learns the new role before the caller does, so that a caller's next decision
    # (another switch, say) sees it in the topology. Best effort: the heartbeat repeats it.
    await rt.report()
    return result


async def _empty_decode(rt, targets: list[Target], result: SwitchResult) -> None:
    """Move every request this worker holds; wait for those that cannot move to finish."""
    engine = rt.decode
    t0 = time.perf_counter()
    started: dict[str, asyncio.Task] = {}
    stuck: set[str] = set()  # no room anywhere: they finish here
    log.info("%s: moving %d request(s) (%s) to %s", rt.worker_id, len(engine.scheduler.seqs),
             ", ".join(f"{s.state.value}" for s in engine.scheduler.seqs.values()),
             [(t.worker_id, t.free_blocks) for t in targets])
    while engine.scheduler.seqs:
        # Those waiting for their KV are moved once it lands (services/decode/migration_plan.py).
        for seq in movable(list(engine.scheduler.seqs.values()), lambda rid: rid in started or rid in stuck):
            started[seq.request_id] = asyncio.create_task(rt.migrator.migrate(seq, targets))
        pending = [t for rid, t in started.items() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(POLL_S)
        for rid, task in started.items():
            if task.done() and rid not in stuck:
                move = _outcome(rid, task)
                if not move.moved_to and not move.ended_here:
                    stuck.add(rid)
                    log.warning("request %s stays on %s until it finishes: %s", rid, rt.worker_id, move.error)
    await asyncio.gather(*started.values(), return_exceptions=True)  # a move ends just after its request leaves
    result.moves = [_outcome(rid, t) for rid, t in started.items()]
    result.drained_requests = len(stuck)
    result.migration_seconds = time.perf_counter() - t0
    if stuck:
        result.note = f"{len(stuck)} request(s) found no decode worker with room and finished here"
        result.drain_seconds = result.migration_seconds


def _outcome(request_id: str, task: asyncio.Task) -> MoveResult:
    if task.cancelled():
        return MoveResult(request_id, error="cancelled")
    if task.exception() is not None:
        return MoveResult(request_id, error=f"{type(task.exception()).__name__}: {task.exception()}")
    return task.result()
