"""The reconfiguration policy: turns a target Split and the workers' reports into role changes.
Pure and stateful: no I/O, no clock reads; every call gets `now` (seconds, the caller's clock).

    policy = ReconfigPolicy(PolicyConfig(...))
    changes = policy.decide(now, workers, target)     # -> list[RoleChange]; the planner applies them
    policy.record_switch(now, change, ok)             # when a switch has finished (or failed)

Split of duties. The planner makes the forecast far enough ahead to cover a switch (drain plus
warm-up) and computes the target from it (services/planner/split.py). This policy is proactive in
that it acts on that target as soon as hysteresis allows, not when queues already overflow; the
emergency path is the safety net for what the forecast missed. The planner applies the changes and
reports each outcome with record_switch.

Rules, in the order decide() applies them:
  1. Hysteresis: the target must differ from the current split by >= min_diff workers, in the same
     direction, for persist_intervals consecutive calls. A flip of direction restarts the count.
  2. Emergency (bypasses hysteresis and cooldown): a role under pressure (prefill: queued prompt
     tokens per prefill worker above emergency_prefill_queue_tokens; decode: KV usage above
     emergency_kv_usage; either: no worker of the role at all, on two calls in a row) gets one
     worker from the other role at once, unless an emergency move toward it is still under way. If
     both roles are under pressure, nothing moves: a move would only shift the overload. An
     emergency call returns only the emergency change.
     A role missing on one call only changes nothing at all: at start the workers' first
     heartbeats arrive one by one, and a planner that saw the decode workers a moment before the
     prefill worker once turned a decode worker into a second prefill worker.
  3. Cooldown: no forecast move while a switch is under way (one we issued, or a worker reports
     `switching`), nor within cooldown_s of the last completed switch.
  4. Forecast move: up to max_switches_per_interval workers toward the target; when the role it
     would grow already has the workers the split's need asks for (only spare capacity would
     move), the gap must be at least spare_min_diff (in virtual time, benchmarks/bench_policy.py:
     10 switches instead of 77 in a quiet 600 s of the Azure conv trace, 76.6% instead of 61.3% on
     a prefill-bound Azure mix, 99.7% instead of 99.8% on phase-shift).

Seats (any move, emergency included): a decode worker leaves only while the decode workers that
stay can seat every request the decode workers hold (running and waiting) within the TPOT SLO,
at most the target's `decode_c_tpot` each (services/planner/split.py). Otherwise its requests would
migrate onto batches too big to meet the SLO: admitted requests would miss it, the very thing
admission control refuses others to prevent. (KV is not counted here: a migration without room
fails and the request stays, and KV pressure has its emergency rule.)

Which worker: decode -> prefill takes the decode worker with the fewest running + waiting
requests (least KV to migrate); prefill -> decode the prefill worker with the least queued prefill
tokens; ties by worker_id. A worker whose switch failed is skipped for cooldown_s.

Invariants (every call): at most max_switches_per_interval changes, all toward one role, at most
one per worker, none for a worker that is `switching` or has a change of ours under way, and a
role never drops below min_per_role workers that serve it (not switching, no change under way).

Mixed workers (services/planner/configuration.py). A target names the role of its non-prefill
workers (`Split.rest_role`: decode or mixed). The rules above count prefill against the rest (a
mixed worker decodes, so it counts as a decode worker), and a worker that leaves prefill takes the
rest's role. Prefill may drop to zero when the rest is mixed (mixed workers prefill for
themselves): then a missing prefill worker (or its queue) is no emergency. Moves that carry no KV
come first, all at once, outside the cooldown and without hysteresis (the configuration core
changes its choice only for a predicted gain, services/planner/configuration.py): a non-prefill
worker of the other kind (decode where the target is mixed, or the reverse: a decode worker only
starts or stops taking prompts), and prefill workers the mixed target has no place for (each
drains its queue). A decode worker becomes mixed -> decode only once a prefill worker exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.load import Split, WorkerLoad

PREFILL = "prefill"
DECODE = "decode"
MIXED = "mixed"
ROLES = (PREFILL, DECODE)  # prefill, and the rest (decode or mixed workers, counted as decode)
WORKER_ROLES = (PREFILL, DECODE, MIXED)


def _other(role: str) -> str:
    return DECODE if role == PREFILL else PREFILL


def _side(role: str) -> str:
    """prefill, or decode for any worker that decodes (decode or mixed)."""
    return PREFILL if role == PREFILL else DECODE


@dataclass(frozen=True)
class PolicyConfig:
    cooldown_s: float = 30.0  # after a completed switch, no forecast move for this long
    max_switches_per_interval: int = 1  # changes one decide() call may return
    min_diff: int = 1  # hysteresis: |target - current| prefill workers needed to act
    persist_intervals: int = 2  # hysteresis: consecutive calls the target must persist
    emergency_prefill_queue_tokens: int = 8192  # queued prompt tokens per prefill worker
    emergency_kv_usage: float = 0.95  # used / total KV blocks over the decode workers
    min_per_role: int = 1
    # When the role a forecast move would grow already has the workers its need asks for, the move
    # only shifts spare capacity: then it waits for a gap of this many workers (noise at low load
    # otherwise flips workers back and forth).
    spare_min_diff: int = 3
    pending_timeout_s: float = 300.0  # a change never reported back is forgotten after this

    @classmethod
    def from_settings(cls, settings) -> PolicyConfig:
        """The policy a planner runs, from PlannerSettings (common/config.py) or any object with
        its field names: the service and the virtual-time simulator build it here alike."""
        return cls(cooldown_s=settings.cooldown_s, persist_intervals=settings.persist_intervals,
                   max_switches_per_interval=settings.max_switches_per_interval,
                   emergency_prefill_queue_tokens=settings.emergency_prefill_queue_tokens,
                   emergency_kv_usage=settings.emergency_kv_usage)

    def __post_init__(self) -> None:
        if self.cooldown_s < 0 or self.pending_timeout_s <= 0:
            raise ValueError("cooldown_s must be >= 0 and pending_timeout_s > 0")
        if self.max_switches_per_interval < 1 or self.min_diff < 1 or self.persist_intervals < 1:
            raise ValueError("max_switches_per_interval, min_diff and persist_intervals must be >= 1")
        if self.min_per_role < 1:
            raise ValueError("min_per_role must be >= 1")
        if self.emergency_prefill_queue_tokens < 1 or not 0 < self.emergency_kv_usage <= 1:
            raise ValueError("need emergency_prefill_queue_tokens >= 1 and 0 < emergency_kv_usage <= 1")


@dataclass(frozen=True)
class RoleChange:
    worker_id: str
    to_role: str  # "prefill" | "decode" | "mixed"
    reason: str  # "forecast: ..." | "emergency: ..."

    @property
    def emergency(self) -> bool:
        return self.reason.startswith("emergency")


@dataclass(frozen=True)
class _Pending:
    change: RoleChange
    since: float


class ReconfigPolicy:
    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self._pending: dict[str, _Pending] = {}  # changes issued and not yet reported back
        self._failed: dict[str, float] = {}  # worker_id -> when its switch failed
        self._last_switch_at: float | None = None
        self._direction = 0  # +1: target wants more prefill, -1: more decode, 0: close enough
        self._streak = 0  # consecutive calls with that direction
        self._missing_calls = 0  # consecutive calls that saw a role with no worker

    @property
    def pending(self) -> Mapping[str, str]:
        """worker_id -> role, for every change issued and not yet reported back."""
        return {wid: p.change.to_role for wid, p in self._pending.items()}

    def record_switch(self, now: float, change: RoleChange, ok: bool) -> None:
        """The outcome of a change decide() returned. A success starts the cooldown; a failure
        leaves the split as it was (so the target still applies) and benches that worker."""
        pending = self._pending.get(change.worker_id)
        if pending is not None and pending.change.to_role == change.to_role:
            del self._pending[change.worker_id]
        if ok:
            self._last_switch_at = now
        else:
            self._failed[change.worker_id] = now

    def decide(self, now: float, workers: Sequence[WorkerLoad], target: Split) -> list[RoleChange]:
        cfg = self.config
        ws = {w.worker_id: w for w in workers if w.role in WORKER_ROLES}
        self._forget(now, ws)
        exact = {wid: self._pending[wid].change.to_role if wid in self._pending else w.role for wid, w in ws.items()}
        role = {wid: _side(r) for wid, r in exact.items()}  # prefill, or decode for decode and mixed
        count = {r: sum(1 for x in role.values() if x == r) for r in ROLES}
        # Serving: counted toward a role and free to leave it. Only these may move, and a role
        # keeps at least min_per_role of them: a switching worker is not serving anyone.
        movable = {wid for wid, w in ws.items() if not w.switching and wid not in self._pending}
        serving = {r: sum(1 for wid in movable if role[wid] == r) for r in ROLES}
        rest = target.rest_role if target.total > 0 else DECODE
        floor = {PREFILL: 0 if rest == MIXED else cfg.min_per_role, DECODE: cfg.min_per_role}

        desired = self._desired_prefill(len(ws), target, floor[PREFILL])
        diff = desired - count[PREFILL] if desired is not None else 0
        kind = [wid for wid in movable if role[wid] == DECODE and exact[wid] != rest]
        self._update_streak(diff, bool(kind))

        needed = [r for r in ROLES if floor[r] > 0]
        self._missing_calls = self._missing_calls + 1 if ws and min(count[r] for r in needed) == 0 else 0
        if self._missing_calls == 1:
            return []  # perhaps a heartbeat not in yet: look again next call before acting
        if kind and rest == DECODE and count[PREFILL] < cfg.min_per_role:
            kind = []  # mixed workers are the only ones that prefill: a prefill worker first
        # Toward the configuration's kind: decode <-> mixed, and prefill -> mixed where the
        # target has fewer prefill workers. No KV moves, so every such worker at once, ahead of
        # the emergency rules (it is what relieves them), outside the cooldown, and without
        # hysteresis: the configuration core changes its choice only for a predicted gain.
        cheap = [RoleChange(wid, rest, f"configuration: {target.name}, {exact[wid]} to {rest}")
                 for wid in sorted(kind)]
        if rest == MIXED and diff < 0:
            cheap += [RoleChange(wid, MIXED, f"configuration: {target.name}, prefill to mixed")
                      for wid in self._pick(ws, role, movable, PREFILL)[:-diff]]
        if cheap:
            return self._issue(now, cheap)
        emergency = self._emergency(ws, role, count, serving, movable, target, floor)
        if emergency is not None:
            return self._issue(now, [emergency])

        if self._streak < cfg.persist_intervals or abs(diff) < cfg.min_diff:
            return []
        if self._pending or any(w.switching for w in ws.values()):
            return []  # a switch is under way: the counts are in flux
        to_role = PREFILL if diff > 0 else rest
        if self._last_switch_at is not None and now - self._last_switch_at < cfg.cooldown_s:
            return []
        need = target.detail.get(f"{_side(to_role)}_need_workers")
        if need is not None and count[_side(to_role)] >= need and abs(diff) < cfg.spare_min_diff:
            return []  # only spare capacity would move: not worth the churn unless the gap is large
        donor = _other(_side(to_role))
        room = max(0, serving[donor] - floor[donor])
        while room and self._decode_seats_short(ws, donor, room, target):
            room -= 1
        chosen = self._pick(ws, role, movable, donor)[:min(abs(diff), cfg.max_switches_per_interval, room)]
        reason = (f"forecast: target {target.prefill}P/{target.total - target.prefill}{rest[0].upper()}, "
                  f"now {count[PREFILL]}P/{count[DECODE]}D")
        return self._issue(now, [RoleChange(wid, to_role, reason) for wid in chosen])

    # -- the rules ---------------------------------------------------------------------------

    def _desired_prefill(self, n: int, target: Split, least: int) -> int | None:
        """The target's prefill count for the n workers there are now (the target may have been
        computed for another total: scale it), kept within [least, n - min_per_role]."""
        if target.total <= 0 or n < least + self.config.min_per_role:
            return None  # no usable target, or too few workers to have the floor of each
        p = target.prefill if target.total == n else int(target.prefill * n / target.total + 0.5)
        return min(max(p, least), n - self.config.min_per_role)

    def _update_streak(self, diff: int, kind: bool) -> None:
        """`kind`: some non-prefill workers are of the other kind than the target's (a direction of
        its own, 2, for the streak)."""
        direction = 0 if abs(diff) < self.config.min_diff else (1 if diff > 0 else -1)
        if direction == 0 and kind:
            direction = 2
        self._streak = self._streak + 1 if direction != 0 and direction == self._direction else int(direction != 0)
        self._direction = direction

    def _emergency(self, ws: Mapping[str, WorkerLoad], role: Mapping[str, str], count: Mapping[str, int],
                   serving: Mapping[str, int], movable: set[str], target: Split,
                   floor: Mapping[str, int]) -> RoleChange | None:
        cfg = self.config
        if not ws:
            return None
        pressure: dict[str, str] = {}
        pre = [w for w in ws.values() if w.role == PREFILL and not w.switching]
        dec = [w for w in ws.values() if w.role != PREFILL and not w.switching]
        if pre and floor[PREFILL] > 0:  # (mixed workers prefill the prompts prefill workers cannot)
            queued = sum(w.prefill_waiting_tokens for w in pre) / len(pre)
            if queued > cfg.emergency_prefill_queue_tokens:
                pressure[PREFILL] = f"prefill queue {queued:.0f} tokens/worker > {cfg.emergency_prefill_queue_tokens}"
        total_kv = sum(w.kv_blocks_total for w in dec)
        if total_kv:
            usage = sum(w.kv_blocks_used for w in dec) / total_kv
            if usage > cfg.emergency_kv_usage:
                pressure[DECODE] = f"decode KV usage {usage:.2f} > {cfg.emergency_kv_usage:.2f}"
        missing = [r for r in ROLES if count[r] == 0 and floor[r] > 0]
        if missing:  # nothing can be served without both roles: this outranks any queue
            pressure = {missing[0]: f"no {missing[0]} worker"}
        if len(pressure) != 1:
            return None  # none, or both: moving a worker would only shift the overload
        (side, why), = pressure.items()
        if any(p.change.emergency and _side(p.change.to_role) == side for p in self._pending.values()):
            return None  # one emergency move toward a role at a time: let it land first
        donor = _other(side)
        if serving[donor] <= floor[donor] or self._decode_seats_short(ws, donor, 1, target):
            return None
        chosen = self._pick(ws, role, movable, donor)[:1]
        to_role = side if side == PREFILL else (target.rest_role if target.total > 0 else DECODE)
        return RoleChange(chosen[0], to_role, f"emergency: {why}") if chosen else None

    @staticmethod
    def _decode_seats_short(ws: Mapping[str, WorkerLoad], donor: str, leaving: int, target: Split) -> bool:
        """Whether `leaving` decode workers going would leave the rest too few seats within the TPOT
        SLO for the requests the decode workers hold (the module docstring's rule on seats)."""
        seats = target.detail.get("decode_c_tpot")
        if donor != DECODE or not seats:
            return False
        dec = [w for w in ws.values() if w.role != PREFILL and not w.switching]
        held = sum(w.decode_running + w.decode_waiting for w in dec)
        return held > (len(dec) - leaving) * seats

    def _pick(self, ws: Mapping[str, WorkerLoad], role: Mapping[str, str], movable: set[str],
              donor: str) -> list[str]:
        """Movable workers of the donor role, cheapest to move first; recently failed ones out
        (_forget keeps a failure for cooldown_s)."""
        cands = [ws[wid] for wid in movable if role[wid] == donor and wid not in self._failed]
        if donor == DECODE:  # fewest requests holding KV on it: least to migrate or drain
            key = lambda w: (w.decode_running + w.decode_waiting, w.worker_id)
        else:
            key = lambda w: (w.prefill_waiting_tokens, w.worker_id)
        return [w.worker_id for w in sorted(cands, key=key)]

    # -- bookkeeping -------------------------------------------------------------------------

    def _issue(self, now: float, changes: list[RoleChange]) -> list[RoleChange]:
        for c in changes:
            self._pending[c.worker_id] = _Pending(c, now)
        return changes

    def _forget(self, now: float, ws: Mapping[str, WorkerLoad]) -> None:
        """Settle changes without waiting for record_switch: a worker that now reports its new
        role (and is done switching) has switched; one that is gone, or silent past
        pending_timeout_s, is dropped (as failed: no cooldown)."""
        for wid, p in list(self._pending.items()):
            w = ws.get(wid)
            if w is not None and w.role == p.change.to_role and not w.switching:
                del self._pending[wid]
                self._last_switch_at = now
            elif w is None or now - p.since > self.config.pending_timeout_s:
                del self._pending[wid]
        self._failed = {wid: at for wid, at in self._failed.items() if now - at < self.config.cooldown_s}
