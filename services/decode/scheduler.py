"""Continuous-batching decode scheduler. Pure: no tensors, no I/O, no asyncio.

A request's life on a decode worker:

    reserve()        blocks for prompt + max_tokens taken up front (fail fast when short)
      WAITING_KV     the prefill worker is pushing its KV into those blocks
    kv_complete()    KV and first token are in
      READY          waiting for a seat in the running batch (max_batch_size)
      RUNNING        in every step until update() sees EOS or max_tokens
    finish / abort   blocks go back to the pool

Live migration adds one state: pause() takes a READY or RUNNING request out of the batch with its
blocks held (PAUSED), so that its KV stops changing while the tail is copied out; resume() puts it
back (the move failed) and abort() ends it here (the move succeeded). A request migrated in is
reserved like any other and completed by kv_complete_migrated() with its tokens so far.

Reserving the whole request up front means a running request never runs out of KV, so there is
no preemption. abort() may arrive while a step that includes the request is in flight; the
engine then calls it after the step (see DecodeEngine), never during.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field

from common.kv.block_pool import BlockPool, OutOfBlocks, kv_tokens_for
from common.types import SamplingParams


class SeqState(enum.Enum):
    WAITING_KV = "waiting_kv"
    READY = "ready"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"


class Finish(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class DecodeSeq:
    request_id: str
    prompt_len: int
    params: SamplingParams
    block_table: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # completion so far; tokens[0] came from prefill
    state: SeqState = SeqState.WAITING_KV
    finish: Finish | None = None

    @property
    def next_position(self) -> int:
        """Position of the last sampled token, whose KV the next step computes."""
        return self.prompt_len + len(self.tokens) - 1

    def finished_by_last_token(self) -> Finish | None:
        if self.tokens and self.tokens[-1] in self.params.stop_token_ids:
            return Finish.STOP
        if len(self.tokens) >= self.params.max_tokens:
            return Finish.LENGTH
        return None


@dataclass
class StepEnd:
    delivered: list[DecodeSeq]  # requests whose new token goes out (not released during the step)
    finished: list[DecodeSeq]  # of those, the ones the token finished
    paused: dict[str, DecodeSeq | None]  # pauses asked for during the step: the request, or None


class DecodeScheduler:
    def __init__(self, pool: BlockPool, max_batch_size: int) -> None:
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.seqs: dict[str, DecodeSeq] = {}
        self._ready: OrderedDict[str, DecodeSeq] = OrderedDict()
        self._running: dict[str, DecodeSeq] = {}
        # The step in flight (begin_step .. end_step): its requests keep their blocks and seats
        # until it ends, since the model reads and writes them; releases and pauses asked for
        # meanwhile wait for the step's end (settle), releases first.
        self._in_step: set[str] = set()
        self._releases: set[str] = set()
        self._pauses: set[str] = set()
        # Copies into a reservation on another thread (a KV transfer's): a release waits for the
        # last of them, so that no block is lent again while a copy may still write it.
        self._copying: dict[str, int] = {}
        self._copy_releases: set[str] = set()

    # -- admission ---------------------------------------------------------------------------
    def reserve(self, seq: DecodeSeq) -> None:
        """Take the blocks for the whole request. Raises OutOfBlocks, ValueError on a duplicate id."""
        if seq.request_id in self.seqs:
            raise ValueError(f"request {seq.request_id!r} is already on this worker")
        seq.block_table = self.pool.allocate(self.pool.blocks_for(kv_tokens_for(seq.prompt_len, seq.params.max_tokens)))
        seq.state = SeqState.WAITING_KV
        self.seqs[seq.request_id] = seq

    def kv_complete(self, request_id: str, first_token: int) -> DecodeSeq:
        """The prompt's KV and the first token arrived. The request may already be finished."""
        seq = self.seqs[request_id]
        if seq.state is not SeqState.WAITING_KV:
            raise ValueError(f"request {request_id!r} already has its KV")
        seq.tokens.append(first_token)
        finish = seq.finished_by_last_token()
        if finish:
            self._finish(seq, finish)
        else:
            seq.state = SeqState.READY
            self._ready[request_id] = seq
        return seq

    def kv_complete_migrated(self, request_id: str, tokens: list[int]) -> DecodeSeq:
        """A migrated request's KV (prompt_len + len(tokens) - 1 positions) and its completion
        tokens so far arrived; it joins the batch where the source worker left off."""
        seq = self.seqs[request_id]
        if seq.state is not SeqState.WAITING_KV:
            raise ValueError(f"request {request_id!r} already has its KV")
        if not 1 <= len(tokens) < seq.params.max_tokens:
            raise ValueError(f"a migrated request carries 1 to {seq.params.max_tokens - 1} tokens, got {len(tokens)}")
        seq.tokens = list(tokens)
        seq.state = SeqState.READY
        self._ready[request_id] = seq
        return seq

    # -- migration ---------------------------------------------------------------------------
    def pause_or_defer(self, request_id: str) -> tuple[bool, DecodeSeq | None]:
        """(True, seq) paused now; (True, None) it ended or is not decoding; (False, None) it is in
        the step in flight: `settle` pauses it (or says it ended) once the step is over."""
        if request_id in self._in_step:
            self._pauses.add(request_id)
            return False, None
        return True, self._pause_if_decoding(request_id)

    def _pause_if_decoding(self, request_id: str) -> DecodeSeq | None:
        seq = self.seqs.get(request_id)
        if seq is None or seq.state not in (SeqState.READY, SeqState.RUNNING):
            return None
        return self.pause(request_id)

    def pause(self, request_id: str) -> DecodeSeq:
        """Out of the batch, blocks kept. Not for a request inside the step in flight
        (pause_or_defer waits for the step to end)."""
        seq = self.seqs[request_id]
        if seq.state not in (SeqState.READY, SeqState.RUNNING):
            raise ValueError(f"request {request_id!r} is {seq.state.value}; only ready or running ones pause")
        self._ready.pop(request_id, None)
        self._running.pop(request_id, None)
        seq.state = SeqState.PAUSED
        return seq

    def resume(self, request_id: str) -> DecodeSeq:
        seq = self.seqs[request_id]
        if seq.state is not SeqState.PAUSED:
            raise ValueError(f"request {request_id!r} is {seq.state.value}, not paused")
        seq.state = SeqState.READY
        self._ready[request_id] = seq
        return seq

    # -- steps -------------------------------------------------------------------------------
    def begin_step(self) -> list[DecodeSeq]:
        """schedule(), and the batch is the step in flight until end_step or abandon_step."""
        batch = self.schedule()
        self._in_step = {s.request_id for s in batch}
        return batch

    def also_in_step(self, request_ids) -> None:
        """Requests whose prompt chunks the step in flight writes (chunked prefill here): their
        blocks, too, are kept until it ends."""
        self._in_step |= set(request_ids)

    def end_step(self, batch: list[DecodeSeq], next_tokens: list[int]) -> StepEnd:
        """The step's tokens: update(), then settle() what was asked for meanwhile. Requests
        released during the step get no token out (`delivered` leaves them out)."""
        self._in_step = set()
        finished = self.update(batch, next_tokens)
        released = self._releases
        delivered = [s for s in batch if s.request_id not in released]
        finished = [s for s in finished if s.request_id not in released]
        return StepEnd(delivered, finished, self.settle())

    def abandon_step(self) -> None:
        """The step failed: nothing is in flight any more (the caller fails its requests, then
        settle()s)."""
        self._in_step = set()

    def settle(self) -> dict[str, DecodeSeq | None]:
        """Apply the releases, then the pauses, asked for during the step that ended; returns each
        pause's outcome (the paused request, or None if it ended)."""
        for request_id in sorted(self._releases):
            self.abort(request_id)
        self._releases = set()
        paused = {rid: self._pause_if_decoding(rid) for rid in sorted(self._pauses)}
        self._pauses = set()
        return paused

    def release(self, request_id: str) -> bool:
        """Free a request now (True), or once the step it is in, or the copies into its blocks,
        end (False)."""
        if request_id in self._in_step:
            self._releases.add(request_id)
            return False
        if request_id in self._copying:
            self._copy_releases.add(request_id)
            return False
        self.abort(request_id)
        return True

    def begin_copy(self, request_id: str) -> None:
        """A copy into this request's blocks starts on another thread (not for a released one)."""
        if request_id not in self.seqs or request_id in self._copy_releases:
            raise ValueError(f"no copy into {request_id!r}: it is not held, or it is released")
        self._copying[request_id] = self._copying.get(request_id, 0) + 1

    def end_copy(self, request_id: str) -> bool:
        """A copy into its blocks ended; True when a release that waited for the last one was
        applied now."""
        left = self._copying.pop(request_id) - 1
        if left:
            self._copying[request_id] = left
            return False
        if request_id in self._copy_releases:
            self._copy_releases.discard(request_id)
            self.abort(request_id)
            return True
        return False

    def release_pending(self, request_id: str) -> bool:
        """Released, and waiting for a step or a copy to end."""
        return request_id in self._releases or request_id in self._copy_releases

    @property
    def settling(self) -> bool:
        """Releases or pauses wait for the step in flight, or releases for copies."""
        return bool(self._releases or self._pauses or self._copy_releases)

    def schedule(self) -> list[DecodeSeq]:
        """The batch for the next step: every running request, topped up from the ready queue."""
        while self._ready and len(self._running) < self.max_batch_size:
            _, seq = self._ready.popitem(last=False)
            seq.state = SeqState.RUNNING
            self._running[seq.request_id] = seq
        return list(self._running.values())

    def update(self, batch: list[DecodeSeq], next_tokens: list[int]) -> list[DecodeSeq]:
        """Append each sampled token; return the requests that finished in this step."""
        finished = []
        for seq, token in zip(batch, next_tokens, strict=True):
            if seq.state is not SeqState.RUNNING:
                continue  # aborted while the step ran
            seq.tokens.append(token)
            finish = seq.finished_by_last_token()
            if finish:
                self._finish(seq, finish)
                finished.append(seq)
        return finished

    def abort(self, request_id: str) -> DecodeSeq | None:
        seq = self.seqs.get(request_id)
        if seq is not None:
            self._finish(seq, Finish.ABORT)
        return seq

    def _finish(self, seq: DecodeSeq, finish: Finish) -> None:
        self._ready.pop(seq.request_id, None)
        self._running.pop(seq.request_id, None)
        self.seqs.pop(seq.request_id, None)
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.state = SeqState.FINISHED
        seq.finish = finish

    # -- introspection -----------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self.seqs) - len(self._running)

    def has_work(self) -> bool:
        return bool(self._running or self._ready)


__all__ = ["DecodeScheduler", "DecodeSeq", "Finish", "OutOfBlocks", "SeqState", "StepEnd"]
