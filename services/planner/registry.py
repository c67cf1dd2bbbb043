"""The planner's registry of workers. Pure: time comes in as an argument.

A worker is live while its last report is younger than `ttl`. `version` grows whenever the set of
live workers or a role changes, so the gateway can tell a new topology from a refresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

Info = TypeVar("Info")


@dataclass
class _Entry(Generic[Info]):
    info: Info
    role: int
    seen_at: float


@dataclass
class WorkerRegistry(Generic[Info]):
    ttl: float
    version: int = 0
    _entries: dict[str, _Entry[Info]] = field(default_factory=dict)
    _last_live: frozenset[tuple[str, int]] = frozenset()

    def report(self, worker_id: str, role: int, info: Info, now: float) -> None:
        self._entries[worker_id] = _Entry(info, role, now)
        self._refresh(now)

    def remove(self, worker_id: str, now: float) -> None:
        self._entries.pop(worker_id, None)
        self._refresh(now)

    def live(self, now: float) -> list[Info]:
        self._refresh(now)
        return [e.info for _, e in sorted(self._entries.items()) if now - e.seen_at <= self.ttl]

    def _refresh(self, now: float) -> None:
        for worker_id in [w for w, e in self._entries.items() if now - e.seen_at > 10 * self.ttl]:
            del self._entries[worker_id]  # long gone: forget it entirely
        live = frozenset((w, e.role) for w, e in self._entries.items() if now - e.seen_at <= self.ttl)
        if live != self._last_live:
            self._last_live = live
            self.version += 1


@dataclass
class GatewayBook(Generic[Info]):
    """The gateways that fetched the topology within `ttl` (each names itself on every fetch,
    GetTopologyRequest.gateway): for `dopd status`, and for each gateway to know it is not alone."""

    ttl: float
    _seen: dict[str, tuple[Info, float]] = field(default_factory=dict)

    def seen(self, gateway_id: str, info: Info, now: float) -> None:
        self._seen[gateway_id] = (info, now)

    def live(self, now: float) -> list[Info]:
        self._seen = {g: (info, at) for g, (info, at) in self._seen.items() if now - at < self.ttl}
        return [info for _, (info, _) in sorted(self._seen.items())]
