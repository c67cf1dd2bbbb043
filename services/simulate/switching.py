"""Role switches in virtual time, around the real RoleState (services/worker/role_state.py) and
the target's real DecodeScheduler/BlockPool, as services/worker/role_switch.py and
services/decode/migration.py do them:

    prefill -> decode   RoleState refuses new prompts; the switch ends when the prompts accepted
    prefill -> mixed    have run and their KV has left (PrefillEngine.busy)
    decode <-> mixed    at once: its requests stay; a mixed worker's queued prompts are prefilled
                        there still, and a decode worker's next step takes the mixed chunk budget
    decode -> prefill   RoleState refuses new reservations; every request held moves to the
    mixed -> prefill    (a mixed worker's own prompts move once their last chunk has run)
                        serving decode (or mixed) worker with the most free blocks that can hold it (its
                        whole reservation, reserved there at once, as `begin.adopt`). A request
                        still waiting for its KV moves once it lands. One with no room anywhere
                        finishes here. The switch ends when no request is left.

Which requests move, to where, and each move's steps come from the same pure core as the
worker's (services/decode/migration_plan.py: `movable`, `targets_in_order`, `MovePlan`); here each
Send and HandOver takes its bytes' time on the source's link, and a Pause waits for the request's
step to end. The target adopts the request (kv_complete_migrated with its tokens) and decodes on.
The request's pause is the tail's transfer (plus the wait for the step to end); its next token's
gap includes it. A request that ends on the source meanwhile frees the target's reservation; one
that times out is aborted on both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from common.kv.block_pool import kv_tokens_for
from common.types import Role
from services.decode.migration_plan import HandOver, MovePlan, Send, movable, targets_in_order
from services.decode.scheduler import DecodeSeq
from services.simulate.events import EventLoop
from services.simulate.workers import SimRequest, SimWorker


class SwitchHost(Protocol):
    """What a switch needs of the cluster it runs in (services/simulate/cluster.Cluster is it)."""

    loop: EventLoop
    workers: list[SimWorker]
    by_rid: dict[str, SimRequest]
    kv_bytes_per_token: int
    chunk_budget: int  # a mixed worker's step budget
    chunk_tokens: int  # a decode worker's

    def count_decode(self, worker: SimWorker, r: SimRequest, sign: int) -> None: ...

    def became_ready(self, d: SimWorker, seq: DecodeSeq) -> None: ...



@dataclass(eq=False)
class Switch:
    worker: SimWorker
    from_role: Role
    to_role: Role
    started: float
    on_done: Callable[[Switch], None]
    reason: str = ""
    ended: float | None = None
    moves_in_flight: int = 0
    migrated: int = 0
    migrated_bytes: int = 0
    drained: int = 0  # requests that found no room elsewhere and finished here
    pauses: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return (self.ended if self.ended is not None else self.started) - self.started

    def record(self) -> dict:
        return {"worker": self.worker.worker_id, "from": str(self.from_role), "to": str(self.to_role),
                "reason": self.reason, "t": self.started, "seconds": self.seconds, "migrated": self.migrated,
                "migrated_bytes": self.migrated_bytes, "drained": self.drained,
                "max_pause_s": max(self.pauses, default=0.0)}


@dataclass(eq=False)
class Move:
    req: SimRequest
    seq: DecodeSeq
    src: SimWorker
    dst: SimWorker
    plan: MovePlan = field(default_factory=MovePlan)
    paused_at: float | None = None
    dead: bool = False


class Switcher:
    def __init__(self, cluster: SwitchHost) -> None:
        self.c = cluster
        self.done: list[Switch] = []

    def begin(self, w: SimWorker, to: Role, on_done: Callable[[Switch], None], reason: str = "") -> Switch:
        c = self.c
        from_role = w.state.role
        if from_role.decodes and to is Role.PREFILL:
            # The policy never moves the last worker that decodes; role_switch.py refuses it too.
            assert any(x is not w and x.serves(Role.DECODE) for x in c.workers), \
                f"{w.worker_id} is the last worker that decodes"
        if from_role is Role.PREFILL and to is Role.DECODE:
            # Nor the last prefill worker while no mixed worker prefills for itself.
            assert any(x is not w and (x.serves(Role.PREFILL) or x.serves(Role.MIXED)) for x in c.workers), \
                f"{w.worker_id} is the last prefill worker serving"
        w.state.begin_switch(to)
        sw = w.switch = Switch(w, from_role, to, c.loop.now, on_done, reason)
        if from_role.decodes and to is Role.PREFILL:
            for seq in movable(list(w.decode.seqs.values()), lambda rid: False):
                self.start_move(w, seq)
        self.check(w)
        return sw

    def check(self, w: SimWorker) -> None:
        """End w's switch if nothing is left to drain or move."""
        sw = w.switch
        if sw is None:
            return
        if sw.from_role is Role.PREFILL:
            if w.prefill_busy:
                return
        elif sw.to_role is Role.PREFILL and (w.decode.seqs or sw.moves_in_flight):
            return
        # decode <-> mixed ends at once: its requests stay, a mixed worker's queued prompts finish
        w.state.finish_switch()
        w.local.step_token_budget = self.c.chunk_budget if sw.to_role is Role.MIXED else self.c.chunk_tokens
        w.switch = None
        w.stuck.clear()
        sw.ended = self.c.loop.now
        self.done.append(sw)
        sw.on_done(sw)

    # -- moves ------------------------------------------------------------------------------
    def start_move(self, src: SimWorker, seq: DecodeSeq) -> None:
        c, rid = self.c, seq.request_id
        if rid in src.stuck or c.by_rid[rid].move is not None:
            return
        blocks = src.pool.blocks_for(kv_tokens_for(seq.prompt_len, seq.params.max_tokens))
        targets = targets_in_order((x for x in c.workers if x is not src and x.serves(Role.DECODE)), blocks,
                                   lambda x: x.pool.num_free, lambda x: x.worker_id)
        if not targets:
            src.stuck.add(rid)
            src.switch.drained += 1
            return
        dst = targets[0]
        dst.decode.reserve(DecodeSeq(rid, seq.prompt_len, seq.params))
        r = c.by_rid[rid]
        move = r.move = Move(r, seq, src, dst)
        src.switch.moves_in_flight += 1
        self._step(move)

    def _alive(self, move: Move) -> bool:
        return move.src.decode.seqs.get(move.req.rid) is move.seq

    def _step(self, move: Move) -> None:
        """The move's next step (a pre-copy round's bytes have crossed, or it just began)."""
        if move.dead:
            return
        c, src, seq = self.c, move.src, move.seq
        if not self._alive(move):  # finished here meanwhile
            self._end(move)
            return
        step = move.plan.next(seq.next_position)
        if isinstance(step, Send):
            c.loop.at(src.link.send(c.loop.now, (step.end - step.start) * c.kv_bytes_per_token), self._step, move)
            return
        decided, paused = src.decode.pause_or_defer(move.req.rid)  # Pause: now, or after its step
        if decided:
            self._paused(move, paused)
        else:
            src.pause_waiters[move.req.rid] = lambda paused: self._paused(move, paused)

    def _paused(self, move: Move, seq: DecodeSeq | None) -> None:
        if move.dead:
            return
        if seq is None:
            self._end(move)
            return
        c = self.c
        move.paused_at = c.loop.now
        move.plan.on_paused()
        step = move.plan.next(seq.next_position)
        assert isinstance(step, HandOver)
        c.loop.at(move.src.link.send(c.loop.now, (step.end - step.start) * c.kv_bytes_per_token), self._handover, move)

    def _handover(self, move: Move) -> None:
        if move.dead:
            return
        c, r, src, dst = self.c, move.req, move.src, move.dst
        sw = src.switch
        dst.decode.kv_complete_migrated(r.rid, list(move.seq.tokens))
        src.decode.abort(r.rid)  # paused, so in no step: its blocks go back now
        r.decode_worker, r.move = dst, None
        c.count_decode(src, r, -1)
        c.count_decode(dst, r, +1)
        sw.moves_in_flight -= 1
        sw.migrated += 1
        sw.migrated_bytes += move.plan.copied * c.kv_bytes_per_token
        sw.pauses.append(c.loop.now - move.paused_at)
        c.became_ready(dst, dst.decode.seqs[r.rid])
        self.check(src)

    def _end(self, move: Move) -> None:
        """The request ended on the source before it moved: the target's reservation goes."""
        move.dead = True
        move.dst.decode.abort(move.req.rid)  # waiting for KV: in no step
        move.req.move = None
        move.src.switch.moves_in_flight -= 1
        self.check(move.src)

    def abort_move(self, r: SimRequest) -> None:
        """r timed out while moving (the cluster has released it on the source)."""
        if r.move is not None:
            self._end(r.move)
