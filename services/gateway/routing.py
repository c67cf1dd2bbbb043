"""Which prefill and which decode worker take a request. Pure.

Least loaded for now: prefill by the prompt tokens this gateway has outstanding on each worker,
decode by the requests outstanding, then by the most free KV blocks last reported. The decode
order is a preference list: when a worker refuses the reservation (out of blocks), the gateway
tries the next.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    address: str
    kv_free_blocks: int
    block_size: int
    kv_transports: tuple[str, ...] = ()  # how it reads peers' KV besides PushKV chunks (WorkerInfo)
    chunk_budget: int = 0  # a mixed worker's tokens a step, for its own prefill (WorkerInfo)


def pick_prefill(workers: list[WorkerView], outstanding_tokens: dict[str, int]) -> WorkerView | None:
    if not workers:
        return None
    return min(workers, key=lambda w: (outstanding_tokens.get(w.worker_id, 0), w.worker_id))


def decode_preference(workers: list[WorkerView], outstanding: dict[str, int], tokens_needed: int) -> list[WorkerView]:
    """Decode workers, best first; those whose last report shows too few free blocks go last."""
    def key(w: WorkerView):
        short = w.kv_free_blocks < -(-tokens_needed // max(1, w.block_size))  # whole blocks, as reserved
        return (short, outstanding.get(w.worker_id, 0), -w.kv_free_blocks, w.worker_id)
    return sorted(workers, key=key)
