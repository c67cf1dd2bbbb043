"""What this gateway has on each decode worker, for routing and for the decode seats: how many
requests (`counts`, what routing.decode_preference balances), the sum of their mean contexts (what
SchedulingPolicy.has_seat adds a newcomer to) and the tokens each has still to make there (when
its seat frees: SchedulingPolicy.seat_wait_s). Pure bookkeeping, no I/O.

Invariant: for every worker, counts[w] == len(what it holds) and the context sum is that of the
requests it holds (a request leaves with the context it joined with).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections import defaultdict

from services.gateway.routing import WorkerView
from services.gateway.scheduling import DecodeCandidate


class DecodeLoad:
    def __init__(self) -> None:
        self.counts: Tally[str] = Tally()
        self._context: Tally[str] = Tally()
        self._held: defaultdict[str, dict[str, tuple[float, int]]] = defaultdict(dict)  # id -> (context, left)

    def join(self, worker_id: str, request_id: str, context: float, tokens: int) -> None:
        self.counts[worker_id] += 1
        self._context[worker_id] += context
        self._held[worker_id][request_id] = (context, tokens)

    def leave(self, worker_id: str, request_id: str) -> None:
        context, _ = self._held[worker_id].pop(request_id)
        self.counts[worker_id] -= 1
        self._context[worker_id] -= context

    def made(self, worker_id: str, request_id: str, tokens_left: int) -> None:
        """`request_id` has `tokens_left` to make on `worker_id` now."""
        held = self._held[worker_id]
        if request_id in held:
            held[request_id] = (held[request_id][0], tokens_left)

    def candidate(self, w: WorkerView, with_tokens_left: bool = False) -> DecodeCandidate:
        left = tuple(t for _, t in self._held[w.worker_id].values()) if with_tokens_left else ()
        return DecodeCandidate(w.worker_id, w.kv_free_blocks, w.block_size, self.counts[w.worker_id],
                               self._context[w.worker_id], left)
