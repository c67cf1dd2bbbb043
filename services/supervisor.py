"""When to restart a process that died: `dopd up`'s supervision, as compose's
`restart: unless-stopped`. Pure: no processes, no clock; the caller says when a process started and
when it was seen dead, and asks which restarts are due now (services/launcher.py
`Cluster.supervise` does the I/O, services/cli.py `_up` the loop).

A process that dies is restarted, whatever its exit code but one, after a backoff that doubles
with each crash of a streak (0.5 s, 1 s, 2 s, ... up to 30 s). The exception is EXIT_MODEL_REFUSED
(common/errors.py): a worker that refused its model at load would refuse it again, so it is left
down (`refused`) and its refusal reported. A process that stayed up `stable_after_s`
before it died starts a new streak: its next restart waits the first backoff again. After `stop()`
nothing is restarted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import EXIT_MODEL_REFUSED


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff_s: float = 0.5
    multiplier: float = 2.0
    max_backoff_s: float = 30.0
    stable_after_s: float = 60.0  # an uptime this long ends a crash streak

    def __post_init__(self) -> None:
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if self.stable_after_s < 0:
            raise ValueError("stable_after_s must be >= 0")

    def backoff(self, attempt: int) -> float:
        """The wait before the `attempt`-th restart of a streak (1, 2, ...)."""
        if attempt < 1:
            raise ValueError("attempt counts from 1")
        # Capped before it can overflow: the exponent needed to reach the cap is small.
        wait = self.initial_backoff_s
        for _ in range(attempt - 1):
            wait *= self.multiplier
            if wait >= self.max_backoff_s:
                return self.max_backoff_s
        return min(wait, self.max_backoff_s)


@dataclass(frozen=True)
class Restart:
    """A decision: `name` exited with `exit_code` at `exited_at` after `uptime_s` up, and is to be
    started again at `due_at`, `backoff_s` later: the `attempt`-th restart of its streak and its
    `restarts`-th in all (counting this one)."""

    name: str
    exit_code: int | None
    exited_at: float
    uptime_s: float
    attempt: int
    backoff_s: float
    due_at: float
    restarts: int


@dataclass
class _State:
    started_at: float
    streak: int = 0  # restarts since the last stable run
    restarts: int = 0  # restarts done in all
    pending: Restart | None = None  # dead, waiting for its restart
    refused: bool = False  # exited refusing its model: never restarted


@dataclass
class Supervisor:
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    stopped: bool = False
    _states: dict[str, _State] = field(default_factory=dict, init=False, repr=False)

    def started(self, name: str, now: float) -> None:
        """`name` (re)started at `now`: running, nothing pending for it."""
        state = self._states.get(name)
        if state is None:
            self._states[name] = _State(started_at=now)
        else:
            if state.pending is not None:
                state.restarts += 1
            state.started_at, state.pending = now, None

    def knows(self, name: str) -> bool:
        return name in self._states

    def exited(self, name: str, exit_code: int | None, exited_at: float) -> Restart | None:
        """`name` was seen dead at `exited_at`: when to restart it (None once stopped). A process
        reported dead again while its restart is pending keeps that restart."""
        if self.stopped:
            return None
        state = self._states.get(name)
        if state is None:
            raise KeyError(f"{name} was never started")
        if state.pending is not None:
            return state.pending
        if exit_code == EXIT_MODEL_REFUSED:
            state.refused = True
            return None
        uptime = max(0.0, exited_at - state.started_at)
        if uptime >= self.policy.stable_after_s:
            state.streak = 0
        state.streak += 1
        backoff = self.policy.backoff(state.streak)
        state.pending = Restart(name, exit_code, exited_at, uptime, state.streak, backoff, exited_at + backoff,
                                state.restarts + 1)
        return state.pending

    def refused(self, name: str) -> bool:
        """`name` exited refusing its model, and is not restarted."""
        state = self._states.get(name)
        return state is not None and state.refused

    def pending(self, name: str) -> Restart | None:
        state = self._states.get(name)
        return state.pending if state else None

    def due(self, now: float) -> list[Restart]:
        """The restarts whose time has come, earliest first. They stay pending until `started`
        (or, when starting failed, `exited` again: the streak goes on)."""
        if self.stopped:
            return []
        due = [s.pending for s in self._states.values() if s.pending is not None and s.pending.due_at <= now]
        return sorted(due, key=lambda r: (r.due_at, r.name))

    def failed_to_start(self, name: str, now: float) -> Restart | None:
        """Starting `name` again failed at `now`: the next attempt, one backoff step later."""
        state = self._states.get(name)
        if state is None:
            raise KeyError(f"{name} was never started")
        state.started_at, state.pending = now, None
        return self.exited(name, None, now)

    def next_due(self) -> float | None:
        """When the next pending restart is due (None: none pending, or stopped)."""
        if self.stopped:
            return None
        times = [s.pending.due_at for s in self._states.values() if s.pending is not None]
        return min(times) if times else None

    def restarts(self) -> dict[str, int]:
        """Restarts done so far, by name, of those restarted at least once."""
        return {name: s.restarts for name, s in self._states.items() if s.restarts}

    def stop(self) -> None:
        """No restart from now on (Ctrl-C, SIGTERM)."""
        self.stopped = True
        for state in self._states.values():
            state.pending = None
