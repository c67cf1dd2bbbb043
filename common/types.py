"""Domain types shared by every service, free of transport and torch: the role a worker serves
and the sampling parameters of a request. Protobuf conversions live in common/convert.py."""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Below this, dividing logits by the temperature overflows float32; it is greedy in effect (vLLM's epsilon).
GREEDY_EPSILON = 1e-5


class Role(enum.StrEnum):
    """What a worker serves. A StrEnum: `Role.DECODE == "decode"`, so settings and logs stay plain.

    A `mixed` worker decodes like a decode worker (it takes reservations and prefilled KV) and also
    takes whole requests, prefilling them itself in chunks beside its decodes, under a per-step
    token budget the planner sets (aggregation, where every worker is mixed)."""

    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"

    @property
    def decodes(self) -> bool:
        """Takes decode work: reservations, prefilled KV, migrated requests."""
        return self is not Role.PREFILL

    def covers(self, work: Role) -> bool:
        """A worker of this role takes work of the role `work` (a mixed worker takes decode work)."""
        return self is work or (self is Role.MIXED and work is Role.DECODE)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    max_tokens: int = 16
    stop_token_ids: frozenset[int] = frozenset()
    # Completion index of the first token this call samples (> 0 for a replay: common/sampling.py
    # seeds each token by its index in the whole completion).
    index_offset: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON
