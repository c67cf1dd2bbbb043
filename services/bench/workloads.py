"""Seeded synthetic workloads (pure): a registry of name -> generator of `BenchRequest`s.

Nothing is downloaded: each workload draws prompt and output lengths from truncated lognormal
distributions fitted to published statistics of the dataset it imitates, and arrival times
from `arrivals`. The statistics, their sources and what is our own assumption are in
WORKLOADS.md next to this file; in short:

- chat (ShareGPT-like): input median 100 / mean ~210 tokens, output median 150 / mean ~200. The
  means follow `vllm bench serve` on ShareGPT (1000 prompts: 229,711 input tokens with the
  Llama-3.1 chat template, 203,068 output tokens; vllm-project/vllm PR #18566); the vLLM paper
  (Kwon et al., SOSP'23, Fig. 11) reports 161 / 338 with the OPT tokenizer. The medians are ours.
- code (HumanEval-like): input median 130 / mean ~140, output median 110 / mean ~125. HumanEval
  prompts average ~450 characters of signature and docstring (Chen et al. 2021; 609.6 characters
  with evalscope's instruction prefix); DistServe (Zhong et al., OSDI'24) serves it as code
  completion with a tight TTFT SLO.
- summarization (LongBench-like): input median 4,700 / mean ~5,000, output median 170 / mean ~185.
  LongBench's summarization sets are long (GovReport ~8.7k, QMSum ~10.6k, MultiNews ~2.1k words;
  Bai et al. 2023); DistServe uses it as its long-prompt, short-output workload.
- mix: 60% chat, 25% code, 15% summarization, one arrival process.
- phase-shift: a compressed day (quiet chat, a burst of long prompts, a surge of short chat, a
  bursty mixed tail); short chat is Alpaca-like (vLLM paper: input mean 19, output mean 58).

Every generator takes (rate, duration, seed, burstiness, max_context) and clamps each request's
prompt + output to max_context (`clamp_to_context`). Lengths and arrivals come from separate
random streams of the seed, and lengths in fixed chunks, so the same seed at a higher rate sends
the same sequence of requests, only more of them (for steady workloads; phase-shift per phase).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from services.bench.arrivals import RatePhase, arrival_times, piecewise_arrival_times


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: sent `t` seconds after the start, with either a prompt of
    `prompt_tokens` (random) token ids or the text `prompt`, asking for `output_tokens` tokens."""

    t: float
    prompt_tokens: int | None
    prompt: str | None
    output_tokens: int

    def __post_init__(self) -> None:
        if (self.prompt_tokens is None) == (self.prompt is None):
            raise ValueError("a BenchRequest has exactly one of prompt_tokens and prompt")
        if self.prompt_tokens is not None and self.prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if self.output_tokens < 1:
            raise ValueError(f"output_tokens must be >= 1, got {self.output_tokens}")
        if not (self.t >= 0 and math.isfinite(self.t)):
            raise ValueError(f"t must be a finite number >= 0, got {self.t}")


# -- lengths ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lognormal:
    """Lognormal token count with the given median (exp(mu)) and sigma, rounded, and truncated to
    [lo, hi] by redrawing (as a dataset filter drops requests, rather than piling them at a bound)."""

    median: float
    sigma: float
    lo: int
    hi: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        out = np.empty(0, dtype=np.int64)
        while len(out) < n:
            draw = np.rint(np.exp(rng.normal(math.log(self.median), self.sigma, size=max(2 * (n - len(out)), 16))))
            out = np.concatenate([out, draw[(draw >= self.lo) & (draw <= self.hi)].astype(np.int64)])
        return out[:n]


@dataclass(frozen=True)
class LengthProfile:
    name: str
    prompt: Lognormal
    output: Lognormal


CHAT = LengthProfile("chat", Lognormal(100, 1.25, 4, 4096), Lognormal(150, 0.8, 4, 1024))
CODE = LengthProfile("code", Lognormal(130, 0.4, 60, 400), Lognormal(110, 0.5, 30, 400))
SUMMARIZATION = LengthProfile("summarization", Lognormal(4700, 0.4, 1500, 12000), Lognormal(170, 0.4, 64, 512))
SHORT_CHAT = LengthProfile("short-chat", Lognormal(17, 0.6, 4, 256), Lognormal(45, 0.75, 4, 512))
PROFILES = {p.name: p for p in (CHAT, CODE, SUMMARIZATION, SHORT_CHAT)}

# (profile, weight): the mix workload, and the tail of phase-shift.
MIX = ((CHAT, 0.60), (CODE, 0.25), (SUMMARIZATION, 0.15))


def clamp_to_context(prompt_tokens: int, output_tokens: int, max_context: int) -> tuple[int, int]:
    """Fit prompt + output into max_context: the prompt is cut first (as benchmarks cut a long
    conversation to the model's context); the output is cut only where it would leave the prompt
    less than half the context, and then to half of it. Both stay >= 1."""
    if max_context < 2:
        raise ValueError(f"max_context must be >= 2, got {max_context}")
    if prompt_tokens + output_tokens <= max_context:
        return prompt_tokens, output_tokens
    if output_tokens > max_context // 2:
        output_tokens = max(1, max_context // 2)
    return max(1, min(prompt_tokens, max_context - output_tokens)), output_tokens


LENGTH_CHUNK = 1024


def _lengths(mixture: Sequence[tuple[LengthProfile, float]], seed: int, stream: int,
             n: int) -> list[tuple[int, int]]:
    """n (prompt, output) pairs, each from a profile drawn by weight. Drawn in fixed chunks, each
    from its own generator, so the first k pairs are the same whatever n (a rate sweep with one
    seed sends the same requests, only more of them)."""
    weights = np.array([w for _, w in mixture], dtype=float)
    out: list[tuple[int, int]] = []
    for chunk in range(math.ceil(n / LENGTH_CHUNK)):
        rng = np.random.default_rng([seed, stream, chunk])
        kinds = rng.choice(len(mixture), size=LENGTH_CHUNK, p=weights / weights.sum())
        prompts = np.zeros(LENGTH_CHUNK, dtype=np.int64)
        outputs = np.zeros(LENGTH_CHUNK, dtype=np.int64)
        for k, (profile, _) in enumerate(mixture):
            idx = np.flatnonzero(kinds == k)
            prompts[idx] = profile.prompt.sample(rng, len(idx))
            outputs[idx] = profile.output.sample(rng, len(idx))
        out += zip(prompts.tolist(), outputs.tolist(), strict=True)
    return out[:n]


def _build(times: Sequence[float], lengths: Sequence[tuple[int, int]], max_context: int) -> list[BenchRequest]:
    out = []
    for t, (p, o) in zip(times, lengths, strict=True):
        p, o = clamp_to_context(p, o, max_context)
        out.append(BenchRequest(t=float(t), prompt_tokens=p, prompt=None, output_tokens=o))
    return out


def _steady(mixture: Sequence[tuple[LengthProfile, float]], rate: float, duration: float, seed: int,
            burstiness: float, max_context: int) -> list[BenchRequest]:
    times = arrival_times(rate, duration, np.random.default_rng([seed, 0]), burstiness)
    return _build(times, _lengths(mixture, seed, 1, len(times)), max_context)


# -- registry -----------------------------------------------------------------------------------
Generator = Callable[..., list[BenchRequest]]
WORKLOADS: dict[str, Generator] = {}


def register(name: str) -> Callable[[Generator], Generator]:
    """Add a generator `(rate, duration, seed, burstiness, max_context) -> [BenchRequest]`."""
    def add(fn: Generator) -> Generator:
        WORKLOADS[name] = fn
        return fn
    return add


def generate(name: str, rate: float, duration: float, seed: int = 0, burstiness: float = 1.0,
             max_context: int = 2048) -> list[BenchRequest]:
    """The requests of workload `name`, ordered by arrival time."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(sorted(WORKLOADS))}")
    if duration < 0:
        raise ValueError(f"duration must be >= 0, got {duration}")
    return sorted(WORKLOADS[name](rate=rate, duration=duration, seed=seed, burstiness=burstiness,
                                  max_context=max_context), key=lambda r: r.t)


@register("chat")
def chat(rate, duration, seed=0, burstiness=1.0, max_context=2048):
    return _steady(((CHAT, 1.0),), rate, duration, seed, burstiness, max_context)


@register("code")
def code(rate, duration, seed=0, burstiness=1.0, max_context=2048):
    return _steady(((CODE, 1.0),), rate, duration, seed, burstiness, max_context)


@register("summarization")
def summarization(rate, duration, seed=0, burstiness=1.0, max_context=2048):
    return _steady(((SUMMARIZATION, 1.0),), rate, duration, seed, burstiness, max_context)


@register("mix")
def mix(rate, duration, seed=0, burstiness=1.0, max_context=2048):
    return _steady(MIX, rate, duration, seed, burstiness, max_context)


# -- phase-shift --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    """A slice [start, end) of the run (fractions of the duration) at rate_factor x the rate."""

    name: str
    start: float
    end: float
    rate_factor: float
    mixture: tuple[tuple[LengthProfile, float], ...]
    max_burstiness: float | None = None  # the phase's burstiness is min(this, the run's)


PHASE_SHIFT = (
    Phase("quiet chat", 0.0, 0.2, 0.25, ((CHAT, 1.0),)),
    Phase("long-prompt burst", 0.2, 0.4, 1.0, ((SUMMARIZATION, 1.0),)),
    Phase("short-chat surge", 0.4, 0.7, 3.0, ((SHORT_CHAT, 1.0),)),
    Phase("bursty tail", 0.7, 1.0, 1.0, MIX, max_burstiness=0.25),
)


def phase_rates(rate: float, duration: float, burstiness: float = 1.0) -> list[RatePhase]:
    """The phase-shift schedule in seconds, for the run's reference rate and burstiness."""
    return [RatePhase(p.start * duration, p.end * duration, p.rate_factor * rate,
                      burstiness if p.max_burstiness is None else min(burstiness, p.max_burstiness))
            for p in PHASE_SHIFT]


@register("phase-shift")
def phase_shift(rate, duration, seed=0, burstiness=1.0, max_context=2048):
    out: list[BenchRequest] = []
    per_phase = piecewise_arrival_times(phase_rates(rate, duration, burstiness), np.random.default_rng([seed, 0]))
    for k, (phase, times) in enumerate(zip(PHASE_SHIFT, per_phase, strict=True)):
        out += _build(times, _lengths(phase.mixture, seed, 1 + k, len(times)), max_context)
    return out
