"""DOPD's request scheduling policy, pure (no I/O, no clock of its own): which path a request
takes, on which workers, and whether it is admitted at all.

    long          a prompt above the predicted mean prompt length, or long enough to use the
                  device well alone (its prefill's cost a token within 10% of the profile's best:
                  company gains it nothing), goes at once to the prefill worker with the least
                  outstanding prefill work (routing.pick_prefill: prefill time grows with the
                  tokens, so the fewest tokens is the least work)
    short         the rest are batched, bound late: sent at once while a prefill worker has
                  nothing outstanding; while every one is busy, held until one frees (`flush`),
                  the next would take their tokens past one forward's budget, or the oldest has
                  waited the wait cap, then sent together to the least loaded prefill worker. A
                  prompt queued early on a busy worker may wait behind a long one while another
                  worker frees first
    ultra-short   a prompt whose prefill fits in a decode step's slack under the TPOT SLO (and is
                  among the shortest predicted) is prefilled on the decode worker itself: no KV
                  moves at all
    decode        the worker with the smallest batch among those that can hold the request's whole
                  reservation, then the most free blocks; under admission control, only one with a
                  seat: whose step, with this request in its batch, is still predicted within the
                  TPOT SLO (`has_seat`). With none, the request waits for a seat as for KV
    admission     a request whose predicted TTFT (the prefill of the work queued ahead of it and
                  its own, batched together as the prefill scheduler would; a short prompt's wait
                  for a batch when every worker is busy) is already past the TTFT SLO is refused
                  at once, with the reason, instead of being served late and delaying the others

Every threshold follows the planner's forecast (`LoadForecast`) and the latency profile, never a
constant: `SchedulingPolicy.for_forecast` derives them each interval.
"""

from __future__ import annotations

import enum
import functools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from common.load import SLO, LoadForecast
from common.profile import LatencyProfile

ULTRA_SHORT_QUANTILE = 0.1  # at most the shortest tenth of the predicted prompts skip the KV move
# A prompt whose prefill costs a token within this factor of the profile's cheapest uses the
# device well on its own: batching it with others gains nothing, so it is never held.
BATCHING_PAYS_ABOVE = 1.1
# A short batch waits at most this share of the TTFT SLO (the rest is for its prefill and queue).
WAIT_CAP_SHARE_OF_TTFT = 0.2


class Path(enum.StrEnum):
    LONG = "long"
    SHORT = "short"
    ULTRA_SHORT = "ultra-short"
    MIXED = "mixed"  # prefilled by the mixed worker that decodes it (services/gateway/dispatch.py)


@dataclass(frozen=True)
class DecodeCandidate:
    worker_id: str
    free_blocks: int
    block_size: int
    batch_size: int  # requests it decodes now
    context_tokens: float = 0.0  # the sum of their `mean_context`s
    tokens_left: tuple[int, ...] = ()  # what each has still to make, where known (SchedulingPolicy.seat_wait_s)


# The largest seat limit sent (SchedulingPolicy.seat_limit): past any batch a pool holds.
MAX_SEATS = 1 << 16


def mean_context(prompt_tokens: int, max_tokens: int) -> float:
    """The context a request decodes at, on average over its life: its prompt and half its output."""
    return prompt_tokens + max_tokens / 2


@dataclass(frozen=True)
class SchedulingPolicy:
    long_above: float  # prompt tokens
    ultra_short_up_to: float  # prompt tokens; 0 turns the path off
    batch_token_cap: int
    batch_wait_cap_s: float
    slo: SLO
    profile: LatencyProfile
    admission: bool = True
    mean_output: float = 0.0  # predicted output tokens a request (how long it holds its seat)

    @classmethod
    def for_forecast(cls, forecast: LoadForecast, profile: LatencyProfile, slo: SLO, batch_token_cap: int,
                     typical_decode_batch: int, admission: bool = True) -> SchedulingPolicy:
        """Thresholds for the interval the forecast is for. The ultra-short cap is the shorter of
        the predicted prompts' ULTRA_SHORT_QUANTILE and the longest prompt whose prefill, added to
        a decode step of `typical_decode_batch` requests, still meets the TPOT SLO."""
        prompt = forecast.prompt
        context = prompt.mean + forecast.output.mean / 2
        slack = slo.tpot_s - profile.decode_step_time(max(1, typical_decode_batch), context)
        fits = _longest_prompt_within(profile, slack)
        wait_cap = WAIT_CAP_SHARE_OF_TTFT * slo.ttft_s
        if forecast.rate > 0 and prompt.mean > 0:
            # No longer than the predicted arrivals take to fill a batch: waiting beyond it gains nothing.
            wait_cap = min(wait_cap, batch_token_cap / (forecast.rate * prompt.mean))
        long_above = min(prompt.mean, saturating_prompt(profile))
        return cls(long_above=long_above, ultra_short_up_to=min(prompt.quantile(ULTRA_SHORT_QUANTILE), fits),
                   batch_token_cap=batch_token_cap, batch_wait_cap_s=wait_cap, slo=slo, profile=profile,
                   admission=admission, mean_output=forecast.output.mean)

    def path(self, prompt_tokens: int) -> Path:
        if prompt_tokens <= self.ultra_short_up_to:
            return Path.ULTRA_SHORT
        if prompt_tokens > self.long_above:
            return Path.LONG
        return Path.SHORT

    def decode_workers(self, candidates: Sequence[DecodeCandidate], kv_tokens: int,
                       context: float = 0.0) -> list[DecodeCandidate]:
        """Those that can hold `kv_tokens` and have a seat for a request of mean `context`, best
        first: smallest batch, then most free blocks."""
        fit = [c for c in candidates if c.free_blocks * c.block_size >= kv_tokens and self.has_seat(c, context)]
        return sorted(fit, key=lambda c: (c.batch_size, -c.free_blocks, c.worker_id))

    @functools.cached_property
    def seat_steps(self) -> LatencyProfile:
        """The profile's decode steps made monotone in the batch (LatencyProfile.batch_monotone):
        what seats are judged by."""
        return self.profile.batch_monotone()

    def has_seat(self, worker: DecodeCandidate, context: float) -> bool:
        """Whether `worker` may take a request of mean `context` (`mean_context`) and still step
        within the TPOT SLO: always without admission control, and while it decodes nothing (one
        request alone is served however slow)."""
        if not self.admission or worker.batch_size <= 0:
            return True
        batch = worker.batch_size + 1
        return self.seat_steps.decode_step_time(batch, (worker.context_tokens + context) / batch) <= self.slo.tpot_s

    def seat_limit(self, worker: DecodeCandidate, context: float) -> int:
        """The most requests `worker` may hold, the request of mean `context` among them, and still
        step within the TPOT SLO (0: no limit, without admission control; at least 1). Sent with
        the reservation (DecodeRequest.max_seats): the worker counts every gateway's requests,
        where `has_seat` counts only this gateway's. The mean context per seat is this gateway's
        (its requests and this one), taken for the others' too."""
        if not self.admission:
            return 0
        per_seat = (worker.context_tokens + context) / (worker.batch_size + 1)
        return max(1, self.seat_steps.largest_batch_within(self.slo.tpot_s, per_seat, MAX_SEATS))

    def seat_wait_s(self, workers: Sequence[DecodeCandidate], ahead: int) -> float:
        """Seconds until a seat frees for a request with `ahead` others queued before it, when
        every seat is taken: it gets the (ahead + 1)-th seat to free. A seat frees when its holder
        has made its `tokens_left`, one a step of its worker's batch. Past the seats held now (or
        where what is left is not known), seats free at the steady rate: a request holds its seat
        for the mean output's steps, so a worker frees batch / (mean output x its step) a second."""
        steps = self.seat_steps
        frees: list[float] = []  # seconds until each seat held now frees
        rate = 0.0
        for w in workers:
            if w.batch_size <= 0:
                continue
            step = steps.decode_step_time(w.batch_size, w.context_tokens / w.batch_size)
            frees += [left * step for left in w.tokens_left]
            if self.mean_output > 0:
                rate += w.batch_size / (self.mean_output * step)
        frees.sort()
        if ahead < len(frees):
            return frees[ahead]
        last = frees[-1] if frees else 0.0
        return last + (ahead + 1 - len(frees)) / rate if rate > 0 else last

    def predicted_ttft(self, prompt_tokens: int, path: Path, queued_tokens: int, busy_s: float = 0.0) -> float:
        """Seconds to the first token: the prefill of the work queued ahead on the least loaded
        worker and of the prompt (the scheduler batches them: one forward's cost, not two), less
        what that worker has done of it already (`busy_s`: it has worked on its outstanding
        prompts since the oldest was sent), and (short, when that worker is busy) the longest
        wait for a batch. Never less than the prompt's own prefill."""
        own = self._prefill_s(prompt_tokens)
        if path in (Path.ULTRA_SHORT, Path.MIXED):  # (a mixed worker's queue: Dispatcher.local_ttft_s)
            return own
        wait = self.batch_wait_cap_s if path is Path.SHORT and queued_tokens > 0 else 0.0
        return max(own, self._prefill_s(queued_tokens + prompt_tokens) - busy_s) + wait

    def refusal(self, prompt_tokens: int, path: Path, queued_tokens: int, busy_s: float = 0.0) -> str | None:
        """Why a request is refused (admission control), or None to admit it."""
        if not self.admission:
            return None
        ttft = self.predicted_ttft(prompt_tokens, path, queued_tokens, busy_s)
        if ttft <= self.slo.ttft_s:
            return None
        return (f"overloaded: predicted time to first token {ttft * 1e3:.0f} ms is past the "
                f"{self.slo.ttft_s * 1e3:.0f} ms SLO ({queued_tokens} prompt tokens queued ahead on the least "
                f"loaded prefill worker)")

    def ttft_slack(self, prompt_tokens: int, path: Path, queued_tokens: int, busy_s: float = 0.0) -> float | None:
        """Seconds the predicted TTFT leaves before the SLO: how long the request may still wait
        (for decode KV) under admission control; None without admission control."""
        if not self.admission:
            return None
        return max(0.0, self.slo.ttft_s - self.predicted_ttft(prompt_tokens, path, queued_tokens, busy_s))

    def _prefill_s(self, tokens: int) -> float:
        return self.profile.prefill_time(tokens) if tokens > 0 else 0.0


def saturating_prompt(profile: LatencyProfile) -> float:
    """The shortest profiled prompt whose prefill costs a token within BATCHING_PAYS_ABOVE of
    the cheapest (2048 tokens on llama3-8b-h100, 1024 on its v1, 256 on smollm2-cpu2)."""
    per_token = [(n, profile.prefill_time(int(n)) / n) for n in profile.prefill_tokens if n > 0]
    best = min(c for _, c in per_token)
    return float(min(n for n, c in per_token if c <= BATCHING_PAYS_ABOVE * best))


def _longest_prompt_within(profile: LatencyProfile, seconds: float) -> float:
    """The longest prompt the profile prefills within `seconds` (0 when none does)."""
    if seconds <= 0 or profile.prefill_time(1) > seconds:
        return 0.0
    lo, hi = 1, max(2, int(profile.prefill_tokens[-1]))
    while lo < hi:  # prefill time grows with the tokens: bisect
        mid = (lo + hi + 1) // 2
        if profile.prefill_time(mid) <= seconds:
            lo = mid
        else:
            hi = mid - 1
    return float(lo)


class PrefillLedger:
    """The prompts the gateway has sent to each prefill worker and not had back (first token):
    their tokens (`tokens`, what routing.pick_prefill balances) and since when the worker has
    been busy with them, for admission's prediction. The caller passes the time.

    Busy since: the later of the oldest outstanding prompt's sending and the worker's last
    finished prompt. Before its last finish the worker was (at least partly) busy with prompts
    that are gone from the ledger, so counting from the oldest sending alone would credit it
    with progress on a queue that never shrank (under sustained load, seconds of it)."""

    def __init__(self) -> None:
        self.tokens: Counter[str] = Counter()
        self._sent: dict[str, dict[object, tuple[int, float]]] = {}
        self._last_finished: dict[str, float] = {}

    def sent(self, worker_id: str, key: object, tokens: int, now: float) -> None:
        outstanding = self._sent.setdefault(worker_id, {})
        if key in outstanding:
            raise ValueError(f"{key!r} is already outstanding on {worker_id}")
        outstanding[key] = (tokens, now)
        self.tokens[worker_id] += tokens

    def done(self, worker_id: str, key: object, finished_at: float | None = None) -> None:
        """`key` is no longer outstanding: the worker finished it at `finished_at`, or (None) it
        was withdrawn (its client went away, the call failed) and says nothing of the worker."""
        tokens, _ = self._sent[worker_id].pop(key)
        self.tokens[worker_id] -= tokens
        if finished_at is not None:
            self._last_finished[worker_id] = max(finished_at, self._last_finished.get(worker_id, finished_at))

    def busy_s(self, worker_id: str, now: float) -> float:
        sent = self._sent.get(worker_id)
        if not sent:
            return 0.0
        since = max(min(t for _, t in sent.values()), self._last_finished.get(worker_id, float("-inf")))
        return max(0.0, now - since)

    def least_loaded(self, worker_ids: Iterable[str], now: float,
                     reported: Mapping[str, int] | None = None) -> tuple[int, float]:
        """(outstanding tokens, busy seconds) of the worker with the fewest tokens outstanding;
        (0, 0.0) when there is none. `reported`: the tokens each worker said it has queued (from
        every gateway, a heartbeat old), a floor under this ledger's own."""
        reported = reported or {}

        def tokens(w: str) -> int:
            return max(self.tokens[w], reported.get(w, 0))
        best = min(worker_ids, key=lambda w: (tokens(w), w), default=None)
        return (0, 0.0) if best is None else (tokens(best), self.busy_s(best, now))

    def empty(self) -> bool:
        return not any(self._sent.values()) and not any(self.tokens.values())


@dataclass(eq=False)
class _Held:
    key: object
    tokens: int
    since: float


@dataclass
class ShortBatcher:
    """Short prompts held for one batch, of at most `token_cap` tokens (one prefill forward's
    budget; a single prompt over it is a batch of its own): released when the next prompt would
    take it past the cap, or when the oldest has waited the wait cap (or by `flush`). The caller
    passes the time (the gateway's clock, the simulator's virtual one) and asks `due` when the
    next release may be."""

    token_cap: int
    wait_cap_s: float
    _held: list[_Held] = field(default_factory=list)

    def add(self, key: object, tokens: int, now: float) -> list[object] | None:
        """Hold `key`; returns the batch to send now, if any: those held before it when it would
        take them past the cap (it starts the next batch), or the batch it fills exactly."""
        out = None
        if self._held and sum(h.tokens for h in self._held) + tokens > self.token_cap:
            out = self._release()
        self._held.append(_Held(key, tokens, now))
        if out is None and sum(h.tokens for h in self._held) == self.token_cap:
            out = self._release()
        return out

    def due(self) -> float | None:
        """When the oldest held prompt's wait cap ends (None: nothing held)."""
        return self._held[0].since + self.wait_cap_s if self._held else None

    def poll(self, now: float) -> list[object] | None:
        """The batch whose wait cap has passed, if any."""
        if self._held and now >= self._held[0].since + self.wait_cap_s:
            return self._release()
        return None

    def remove(self, key: object) -> bool:
        """A held prompt whose client went away."""
        for held in self._held:
            if held.key is key:
                self._held.remove(held)
                return True
        return False

    def flush(self) -> list[object]:
        """Every held prompt (a prefill worker has freed: late binding); [] when none is held."""
        return self._release()

    def _release(self) -> list[object]:
        batch, self._held = [h.key for h in self._held], []
        return batch

    def __len__(self) -> int:
        return len(self._held)
