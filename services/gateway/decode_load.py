"""What this gateway has on each decode worker, for routing and for the decode seats: how many
requests (`counts`, what routing.decode_preference balances), the sum of their mean contexts (what
SchedulingPolicy.has_seat adds a newcomer to) and the tokens each has still to make there (when
its seat frees: SchedulingPolicy.seat_wait_s). Pure bookkeeping, no I/O.

One record per request held (its context as it joined, its tokens left); the counts and context
sums are read off those records, so they cannot drift from what is held.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections import defaultdict

from services.gateway.routing import WorkerView
from services.gateway.scheduling import DecodeCandidate


class DecodeLoad:
    def __init__(self) -> None:
        self._held: defaultdict[str, dict[str, tuple[float, int]]] = defaultdict(dict)  # id -> (context, left)

    @property
    def counts(self) -> Tally[str]:
        """Requests held per worker (0 for a worker holding none)."""
        return Tally({worker_id: len(held) for worker_id, held in self._held.items()})

    def join(self, worker_id: str, request_id: str, context: float, tokens: int) -> None:
        self._held[worker_id][request_id] = (context, tokens)

    def leave(self, worker_id: str, request_id: str) -> None:
        del self._held[worker_id][request_id]

    def made(self, worker_id: str, request_id: str, tokens_left: int) -> None:
        """`request_id` has `tokens_left` to make on `worker_id` now."""
        held = self._held[worker_id]
        if request_id in held:
            held[request_id] = (held[request_id][0], tokens_left)

    def candidate(self, w: WorkerView, with_tokens_left: bool = False) -> DecodeCandidate:
        held = self._held[w.worker_id].values()
        left = tuple(t for _, t in held) if with_tokens_left else ()
        return DecodeCandidate(w.worker_id, w.kv_free_blocks, w.block_size, len(held),
                               sum(c for c, _ in held), left)
