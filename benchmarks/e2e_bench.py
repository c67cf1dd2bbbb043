"""Section 2: end-to-end throughput of mixed-length requests, the cluster vs transformers' own
continuous batching (in this process, after the cluster has stopped).

The workload is seeded: prompts of random token ids (lengths uniform in a range), each with its
own output length; greedy, EOS ignored, so every request produces exactly its output length.
Throughput = output tokens / wall time from sending the first request to the last one finishing
(model loading, warm-up and cluster start-up are left out for both contenders).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass

import grpc

from benchmarks.cpu import CpuMeter
from common.rpc.channels import CHANNEL_OPTIONS
from services.client import generate


@dataclass(frozen=True)
class Workload:
    requests: int = 32
    prompt_min: int = 16
    prompt_max: int = 512
    output_min: int = 16
    output_max: int = 64
    seed: int = 0

    def build(self, vocab: int) -> list[tuple[list[int], int]]:
        """[(prompt token ids, output tokens)]; ids stay clear of the special tokens at the low end."""
        rng = random.Random(self.seed)
        out = []
        for _ in range(self.requests):
            n = rng.randint(self.prompt_min, self.prompt_max)
            out.append(([rng.randrange(100, vocab - 1) for _ in range(n)], rng.randint(self.output_min,
                                                                                      self.output_max)))
        return out


def _latency_summary(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"p50_s": statistics.median(ordered), "p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "max_s": ordered[-1]}


# -- the cluster ------------------------------------------------------------------------------
async def _timed(channel, prompt: list[int], max_tokens: int, t0: float):
    c = await generate(channel, prompt, timeout=900.0, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return c, time.perf_counter() - t0


async def _cluster_run(gateway: str, work: list[tuple[list[int], int]], pids: list[int] = ()) -> dict:
    async with grpc.aio.insecure_channel(gateway, options=CHANNEL_OPTIONS) as channel:
        with CpuMeter(pids) as meter:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(_timed(channel, p, n, t0) for p, n in work))
            wall = time.perf_counter() - t0
    completions = [c for c, _ in results]
    tokens = sum(len(c.token_ids) for c in completions)
    exact = sum(len(c.token_ids) == n for c, (_, n) in zip(completions, work, strict=True))
    return {"wall_s": wall, "output_tokens": tokens, "tok_s": tokens / wall, "exact_lengths": exact,
            "latency": _latency_summary([dt for _, dt in results]), "cpu": meter.result,
            "outputs": [list(c.token_ids) for c in completions]}


def warm_cluster(gateway: str, vocab: int) -> None:
    """A few short requests so that first-call costs (channels, allocator, kernels) are paid before timing."""
    work = Workload(requests=4, prompt_min=16, prompt_max=64, output_min=4, output_max=8, seed=99).build(vocab)
    asyncio.run(_cluster_run(gateway, work))


def run_cluster_e2e(gateway: str, work: list[tuple[list[int], int]], pids: list[int]) -> dict:
    """pids: the cluster's processes, whose CPU counts as ours (with this client's)."""
    return asyncio.run(_cluster_run(gateway, work, pids))


# -- transformers' continuous batching --------------------------------------------------------
def run_hf_continuous_batching(model_name: str, work: list[tuple[list[int], int]], attn: str = "sdpa",
                               page_size: int = 256, log=print) -> dict:
    """model.generate_batch's machinery, driven through its manager so that each request gets its own
    max_new_tokens (generate_batch takes one for all): add_request(ids, max_new_tokens=n, eos_token_id=-1).

    The KV cache is sized to hold the whole workload at once (num_blocks), like the decode worker's
    pool; left to itself on CPU, transformers sizes it to 60% of RAM, which is slower to set up and run.
    """
    import torch
    import transformers
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    from common.modeling.loader import load_model

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    loaded = load_model(model_name)
    model = loaded.model
    model.set_attn_implementation(attn)
    num_blocks = sum(math.ceil((len(p) + n) / page_size) for p, n in work) + 1
    cb_config = ContinuousBatchingConfig(page_size=page_size, num_blocks=num_blocks, auto_switch_to_flash=False)
    max_new = max(n for _, n in work)
    gen_config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=-1,
                                  pad_token_id=loaded.config.pad_token_id or 0)
    hints = WorkloadHints(max_prompt_length=max(len(p) for p, _ in work), max_generated_length=max_new,
                          num_requests=len(work))
    t = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=gen_config, block=True, timeout=30,
                                                   continuous_batching_config=cb_config,
                                                   workload_hints=hints) as manager:
        warmup_s = time.perf_counter() - t
        log(f"e2e/hf: manager ready in {warmup_s:.1f}s (attn {model.config._attn_implementation}, "
            f"{num_blocks} blocks of {page_size} tokens, {torch.get_num_threads()} threads)")
        with CpuMeter() as meter:
            t0 = time.perf_counter()
            ids = [manager.add_request(p, max_new_tokens=n, eos_token_id=-1) for p, n in work]
            results, finished_at = {}, {}
            while len(results) < len(ids):
                r = manager.get_result(timeout=1)
                if r is None:
                    if not manager.is_running():
                        raise RuntimeError("transformers' continuous batching loop stopped before finishing")
                    continue
                if r.is_finished():
                    results[r.request_id] = r
                    finished_at[r.request_id] = time.perf_counter() - t0
            wall = time.perf_counter() - t0
    errors = [r.error for r in results.values() if r.error]
    if errors:
        raise RuntimeError(f"transformers' continuous batching failed {len(errors)} requests: {errors[0]}")
    outputs = [list(results[i].generated_tokens) for i in ids]
    tokens = sum(len(o) for o in outputs)
    exact = sum(len(o) == n for o, (_, n) in zip(outputs, work, strict=True))
    del model, loaded
    gc.collect()
    return {"wall_s": wall, "output_tokens": tokens, "tok_s": tokens / wall, "exact_lengths": exact,
            "latency": _latency_summary(list(finished_at.values())), "warmup_s": warmup_s, "cpu": meter.result,
            "attn_implementation": attn, "cb_config": {"page_size": page_size, "num_blocks": num_blocks},
            "per_request_max_new_tokens": True, "outputs": outputs}


def compare_outputs(a: list[list[int]], b: list[list[int]]) -> dict:
    """Greedy outputs of the two contenders: identical requests, and agreeing tokens up to the first split."""
    identical = sum(x == y for x, y in zip(a, b, strict=True))
    agree = total = 0
    for x, y in zip(a, b, strict=True):
        total += len(y)
        for s, t in zip(x, y, strict=False):
            if s != t:
                break
            agree += 1
    return {"identical_requests": identical, "requests": len(a), "prefix_agree_tokens": agree, "tokens": total}


def workload_dict(w: Workload) -> dict:
    return asdict(w)
