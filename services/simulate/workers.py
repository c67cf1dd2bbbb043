"""One simulated worker: both role engines' pure cores (a PrefillScheduler and a DecodeScheduler
over a BlockPool), its RoleState, and its outgoing link. The engines' async adapters are what
the cluster models around these (services/simulate/cluster.py); this holds their state only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from common.kv.block_pool import BlockPool
from common.load import WorkerLoad
from common.types import Role
from services.decode.local_prefill import Chunk, LocalPrefill
from services.decode.scheduler import DecodeScheduler, DecodeSeq
from services.gateway.routing import WorkerView
from services.prefill.scheduler import PrefillScheduler
from services.simulate.hardware import Link
from services.worker.role_state import RoleState


@dataclass(eq=False)
class SimRequest:
    """One request as the gateway and the workers see it. Times are virtual seconds."""

    index: int
    rid: str
    t: float
    prompt: int
    max_tokens: int
    # new | held (for a short batch) | prefill (queued or running on a prefill worker) |
    # local (prefilled on its decode worker) | decode | done
    phase: str = "new"
    prefill_worker: SimWorker | None = None
    decode_worker: SimWorker | None = None
    move: object | None = None  # a services.simulate.switching.Move under way
    local_on: bool = False  # queued for its own prefill on a mixed worker (the dispatcher's local_ledger)
    first_at: float | None = None
    last_at: float = 0.0
    done_at: float | None = None
    tokens: int = 0  # delivered to the client
    itls: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass(eq=False)
class SimWorker:
    worker_id: str
    state: RoleState
    prefill: PrefillScheduler[SimRequest]
    decode: DecodeScheduler
    link: Link
    block_size: int
    local: LocalPrefill[SimRequest]  # prompts this worker prefills for itself (chunked)
    prefill_batch: list[SimRequest] | None = None  # the forward that runs now
    handoffs: int = 0  # batches whose KV is still on its way
    batch: list[DecodeSeq] | None = None  # the decode step that runs now
    chunks: list[Chunk[SimRequest]] = field(default_factory=list)  # its prompt chunks
    # Pauses the scheduler deferred to the end of the step in flight: request id -> what to do then.
    pause_waiters: dict[str, Callable[[DecodeSeq | None], None]] = field(default_factory=dict)
    kicked: bool = False  # a decode step start is scheduled
    switch: object | None = None  # a services.simulate.switching.Switch under way
    stuck: set[str] = field(default_factory=set)  # no room elsewhere: these finish here

    @classmethod
    def build(cls, worker_id: str, role: Role, kv_blocks: int, block_size: int, max_batch_size: int,
              token_budget: int, link_gbps: float, chunk_tokens: int) -> SimWorker:
        return cls(worker_id, RoleState(role), PrefillScheduler(token_budget),
                   DecodeScheduler(BlockPool(kv_blocks, block_size), max_batch_size), Link(link_gbps), block_size,
                   LocalPrefill(chunk_tokens))

    @property
    def pool(self) -> BlockPool:
        return self.decode.pool

    def serves(self, role: Role) -> bool:
        """Takes new work of `role` (RoleState says why not otherwise)."""
        return self.state.refusal(role) is None

    @property
    def prefill_busy(self) -> bool:
        """As PrefillEngine.busy: prompts queued or running, or KV still on its way."""
        return bool(self.prefill.num_waiting or self.prefill_batch or self.handoffs)

    def view(self) -> WorkerView:
        return WorkerView(self.worker_id, self.worker_id, self.pool.num_free, self.block_size,
                          chunk_budget=self.local.step_token_budget)

    def counts(self) -> tuple[int, int, int, int]:
        """(prefill waiting, prefill running, decode waiting, decode running), as WorkerInfo."""
        return (self.prefill.num_waiting, len(self.prefill_batch or ()), self.decode.num_waiting,
                self.decode.num_running)

    def load(self) -> WorkerLoad:
        """What the worker's heartbeat tells the planner (services/planner/controller.worker_load)."""
        pw, _, dw, dr = self.counts()
        return WorkerLoad(worker_id=self.worker_id, role=str(self.state.role), prefill_waiting=pw,
                          prefill_waiting_tokens=self.prefill.tokens_waiting, decode_running=dr, decode_waiting=dw,
                          kv_blocks_used=self.pool.num_used, kv_blocks_total=self.pool.num_blocks,
                          switching=self.state.switching)
