"""The planner's load history: records `(t, doc)` kept in memory and mirrored to a Redis stream.

Memory is the truth the planner reasons from; Redis is a mirror that lets a restarted planner
resume. Redis being away never fails an append: the history goes on in memory, a reconnect is
tried at most every `retry_interval_s`, and when Redis answers again everything it lacks is
written back, in order.

Why a stream rather than a sorted set: entry ids are ordered and unique by construction (a
sorted set needs a unique member per record and breaks ties of equal scores by member bytes),
XADD trims by age in the same command (MINID), and XRANGE reads a time window directly.

    RecordLog    pure: the in-memory records, their stream ids, age trimming, what Redis lacks
    LoadHistory  the Redis adapter around it
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from dataclasses import dataclass

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

StreamId = tuple[int, int]  # (milliseconds, sequence), as Redis orders them

WRITE_CHUNK = 256  # records per write-back call, so one call stays well inside the socket timeout
READ_CHUNK = 1000  # entries per XRANGE page

# Appends ARGV[3..] as (id, t, doc) triples, but only if the stream's last id is still ARGV[1]
# (the last id this writer knows Redis holds; '' for an empty or missing stream). Otherwise it
# writes nothing and returns the actual last id. NOTE: this check is what makes write-back exact:
# a Redis restarted empty behind a transparently reconnected client, or a write whose reply timed
# out after Redis applied it, both show up as a mismatch instead of as a gap or as duplicates.
_APPEND_IF_TOP = """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last = ''
if top[1] then last = top[1][1] end
if last ~= ARGV[1] then return {0, last} end
for i = 3, #ARGV, 3 do
  redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[2], ARGV[i], 't', ARGV[i + 1], 'doc', ARGV[i + 2])
end
return {1, last}
"""


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def parse_id(raw: str | bytes) -> StreamId | None:
    text = raw.decode() if isinstance(raw, bytes) else raw
    if not text:
        return None
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _ms(t: float) -> int:
    return max(0, math.floor(t * 1000))


@dataclass(frozen=True)
class Record:
    sid: StreamId
    t: float
    doc: dict
    payload: str  # the doc as JSON, exactly as Redis stores it


class RecordLog:
    """The in-memory history, oldest first. Pure: no I/O, time comes in as arguments.

    Invariant: stream ids strictly increase along the log. A record's id is its time in ms; a
    second record in the same ms (or a time that went backwards) takes the last id's ms with the
    next sequence number, so ids never collide and never go back.
    """

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._records: deque[Record] = deque()
        self._last: StreamId = (0, 0)  # no new record may take this id or a smaller one
        self._now = -math.inf  # latest time seen; age is measured from it

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[tuple[float, dict]]:
        return [(r.t, r.doc) for r in self._records]

    def cutoff(self) -> float:
        return self._now - self.max_age_s

    def next_id(self, t: float) -> StreamId:
        ms = _ms(t)
        return (ms, 0) if ms > self._last[0] else (self._last[0], self._last[1] + 1)

    def reserve(self, sid: StreamId | None) -> None:
        """New records take ids after `sid` (the last id Redis holds, which may be newer)."""
        if sid is not None and sid > self._last:
            self._last = sid

    def append(self, t: float, doc: dict) -> Record:
        payload = json.dumps(doc, separators=(",", ":"))
        # Keep the decoded payload, so memory holds what a restarted planner would read back.
        rec = Record(self.next_id(t), float(t), json.loads(payload), payload)
        self._last = rec.sid
        self._records.append(rec)
        self.advance(t)
        return rec

    def prepend(self, older: list[Record]) -> None:
        """Records read back from Redis, oldest first, all older than what the log holds."""
        self._records.extendleft(reversed(older))
        if older:
            self.reserve(older[-1].sid)
            self.advance(older[-1].t)

    def advance(self, now: float) -> None:
        self._now = max(self._now, now)
        while self._records and self._records[0].t < self.cutoff():
            self._records.popleft()

    def first_id(self) -> StreamId | None:
        return self._records[0].sid if self._records else None

    def after(self, sid: StreamId | None) -> list[Record]:
        """The records newer than `sid` (all of them for None), oldest first."""
        out: list[Record] = []
        for rec in reversed(self._records):
            if sid is not None and rec.sid <= sid:
                break
            out.append(rec)
        out.reverse()
        return out


class LoadHistory:
    """A planner's load history, resumed from and mirrored to the Redis stream at `key`.

    Call `load(now)` once at start, then `append(t, doc)` each interval; `records()` is always
    the complete in-memory history. The Redis client should have short timeouts and no retries
    (as the planner builds it): every Redis call is bounded by its socket timeout.
    """

    def __init__(self, redis_client: aioredis.Redis | None, key: str, max_age_s: float,
                 retry_interval_s: float = 1.0) -> None:
        self.key = key
        self.retry_interval_s = retry_interval_s
        self._log = RecordLog(max_age_s)
        self._redis = redis_client
        self._script = redis_client.register_script(_APPEND_IF_TOP) if redis_client is not None else None
        self._top: StreamId | None = None  # the last id this writer knows Redis holds
        self._ok: bool | None = None  # None: not tried yet
        self._retry_at = 0.0  # time.monotonic() before which a known-down Redis is not tried
        self._backfill_due = True  # Redis' older history not read yet (load() failed or not called)
        self._flushing = False

    @property
    def redis_ok(self) -> bool:
        return self._ok is True

    def records(self) -> list[tuple[float, dict]]:
        return self._log.records()

    async def load(self, now: float) -> list[tuple[float, dict]]:
        """Resume from what Redis holds within the max age; start empty if Redis is away (its
        history is then read back on reconnect)."""
        self._log.advance(now)
        if self._redis is not None:
            await self._sync(force=True)
        return self.records()

    async def append(self, t: float, doc: dict) -> None:
        """Record `doc` at time `t`. Never raises because of Redis (a doc that is not JSON
        serialisable raises TypeError)."""
        self._log.append(t, doc)
        await self._sync(force=False)

    async def sync(self) -> bool:
        """Try Redis now (whatever the retry interval) and write back what it lacks."""
        return await self._sync(force=True)

    async def close(self) -> None:
        """A last attempt to leave Redis complete. The client belongs to the caller."""
        if self._redis is not None and self._log.after(self._top):
            await self._sync(force=True)

    async def _sync(self, force: bool) -> bool:
        if self._redis is None:
            return False
        if self._ok is False and not force and time.monotonic() < self._retry_at:
            return False
        if self._flushing:  # the running sync re-reads the log, so it writes this record too
            return self.redis_ok
        self._flushing = True
        was_down = self._ok is False
        try:
            if self._backfill_due:
                await self._backfill()
            written = await self._write_back()
        except Exception as exc:  # noqa: BLE001 - Redis is a mirror, never a dependency
            self._went_away(exc)
            return False
        finally:
            self._flushing = False
        self._ok = True
        if was_down:
            log.warning("redis history at %s is back; wrote back %d record(s)", self.key, written)
        return True

    def _went_away(self, exc: Exception) -> None:
        self._retry_at = time.monotonic() + self.retry_interval_s
        if self._ok is not False:
            log.warning("redis history at %s unavailable (%s: %s); keeping it in memory, retrying every %.1fs",
                        self.key, type(exc).__name__, exc, self.retry_interval_s)
        self._ok = False

    async def _backfill(self) -> None:
        """Read Redis' history older than memory (all of it, within age, on a fresh start)."""
        top = await self._redis.xrevrange(self.key, "+", "-", count=1)
        self._top = parse_id(top[0][0]) if top else None
        self._log.reserve(self._top)
        first = self._log.first_id()
        end = "+" if first is None else "(" + format_id(first)
        cutoff, older = self._log.cutoff(), []
        start = "-" if math.isinf(cutoff) else str(_ms(cutoff))
        while True:
            page = await self._redis.xrange(self.key, start, end, count=READ_CHUNK)
            for raw_id, fields in page:
                rec = _decode(raw_id, fields)
                if rec is not None and rec.t >= cutoff:
                    older.append(rec)
            if len(page) < READ_CHUNK:
                break
            start = "(" + format_id(parse_id(page[-1][0]))
        self._log.prepend(older)
        self._backfill_due = False

    async def _write_back(self) -> int:
        """Append every record newer than what Redis holds, in chunks; returns how many."""
        written = mismatches = 0
        while True:
            # Even with nothing pending one call goes out: it checks that Redis still ends at _top.
            pending = self._log.after(self._top)[:WRITE_CHUNK]
            args: list[str] = [format_id(self._top) if self._top else "", str(_ms(self._log.cutoff()))]
            for rec in pending:
                args += [format_id(rec.sid), repr(rec.t), rec.payload]
            applied, actual = await self._script(keys=[self.key], args=args)
            if applied:
                if not pending:
                    return written
                self._top = pending[-1].sid
                written += len(pending)
                continue
            # Redis does not end where we thought: restarted (empty or from an older snapshot), a
            # write applied whose reply was lost, or another writer. Go on from what it holds.
            actual_id = parse_id(actual)
            if mismatches == 0:
                log.warning("redis history at %s ends at %s, expected %s; writing back what it lacks",
                            self.key, actual_id and format_id(actual_id), self._top and format_id(self._top))
            mismatches += 1
            if mismatches > 3:
                raise RuntimeError("redis history keeps changing under this writer")
            self._top = actual_id
            self._log.reserve(actual_id)


def _decode(raw_id: str | bytes, fields: dict) -> Record | None:
    get = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    try:
        payload = get["doc"].decode() if isinstance(get["doc"], bytes) else get["doc"]
        return Record(parse_id(raw_id), float(get["t"]), json.loads(payload), payload)
    except (KeyError, ValueError):
        log.warning("skipping a malformed history entry %r", raw_id)
        return None
