"""Section 1: batched decode throughput, our paged path vs a plain Hugging Face forward.

Both contenders decode the same `batch` prompts of `context` random tokens, greedily, in this
process with the same torch threads:

- paged: ModelRunner.decode over a PagedKVStore with block tables. The prompts' KV is written into
  the reserved blocks by ModelRunner.prefill through its on_layer_kv callback (as a prefill
  worker's KV push would), so attention reads real KV.
- hf: a second model instance (sdpa) run as model(input_ids[batch, 1], past_key_values=DynamicCache,
  use_cache=True), the cache built by one batched prefill of [batch, context].

Each round restarts both from the end of the prompt (the paged path overwrites its slots, the HF
cache is cropped back) and runs `steps` decode steps on each, alternating which goes first. Only
the decode steps are timed; a warm-up round comes first and is not counted.
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks.cpu import CpuMeter, describe
from common.kv.block_pool import BlockPool
from common.kv.kv_store import PagedKVStore
from common.modeling.loader import LoadedModel, load_model
from common.modeling.runner import ModelRunner, kv_layout

BLOCK_SIZE = 16  # the workers' default without flash-attn (common/kv/block_pool.py)


@dataclass
class DecodeConfig:
    batch: int = 16
    context: int = 256
    steps: int = 10  # timed steps per round and contender
    rounds: int = 3
    warmup_steps: int = 3
    seed: int = 0


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 1) for _ in range(length)] for _ in range(n)]


class PagedContender:
    name = "paged (ModelRunner.decode)"

    def __init__(self, loaded: LoadedModel, cfg: DecodeConfig, prompts: list[list[int]]) -> None:
        self.cfg = cfg
        blocks_per_request = -(-(cfg.context + max(cfg.steps, cfg.warmup_steps) + 1) // BLOCK_SIZE)
        pool = BlockPool(cfg.batch * blocks_per_request, BLOCK_SIZE)
        self.store = PagedKVStore(kv_layout(loaded), pool.num_blocks, BLOCK_SIZE, loaded.device)
        self.runner = ModelRunner(loaded, self.store)
        self.tables = [pool.allocate(blocks_per_request) for _ in prompts]
        # Packed prompt order: request i's tokens [0, context) go to its own blocks.
        slots = torch.cat([self.store.slots(t, 0, cfg.context) for t in self.tables]).to(loaded.device)

        def on_layer_kv(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:  # [kv_heads, tokens, head_dim]
            self.store.write_tokens(layer, slots, k.transpose(0, 1), v.transpose(0, 1))

        logits = self.runner.prefill(prompts, on_layer_kv)
        self.first = logits.argmax(-1).tolist()

    def run(self, steps: int) -> list[list[int]]:
        tokens, out = self.first, []
        for i in range(steps):
            positions = [self.cfg.context + i] * len(tokens)
            tokens = self.runner.decode(tokens, positions, self.tables).argmax(-1).tolist()
            out.append(tokens)
        return out


class HFContender:
    name = "hf (model forward + DynamicCache)"

    def __init__(self, loaded: LoadedModel, cfg: DecodeConfig, prompts: list[list[int]]) -> None:
        self.cfg = cfg
        self.model = loaded.model
        self.device = loaded.device
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor(prompts, device=self.device), use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        self.first = out.logits[:, -1].argmax(-1).tolist()

    @torch.inference_mode()
    def run(self, steps: int) -> list[list[int]]:
        extra = self.cache.get_seq_length() - self.cfg.context
        if extra > 0:
            self.cache.crop(-extra)
        tokens, out = self.first, []
        for _ in range(steps):
            ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
            logits = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True).logits
            tokens = logits[:, -1].argmax(-1).tolist()
            out.append(tokens)
        return out


def _agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, int]:
    """Tokens that agree before each request's first divergence (greedy runs split after one)."""
    agree = total = 0
    for r in range(len(a[0])):
        total += len(a)
        for step in range(len(a)):
            if a[step][r] != b[step][r]:
                break
            agree += 1
    return agree, total


def run_decode(model_name: str, cfg: DecodeConfig, log=print) -> dict:
    threads = torch.get_num_threads()
    log(f"decode: loading two instances of {model_name} (torch threads {threads})")
    paged_model = load_model(model_name)
    hf_model = load_model(model_name)
    vocab = paged_model.config.vocab_size
    prompts = random_prompts(cfg.batch, cfg.context, vocab, cfg.seed)
    t = time.perf_counter()
    paged = PagedContender(paged_model, cfg, prompts)
    paged_prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    hf = HFContender(hf_model, cfg, prompts)
    hf_prefill_s = time.perf_counter() - t
    log(f"decode: prefill of {cfg.batch}x{cfg.context} took {paged_prefill_s:.2f}s (paged), "
        f"{hf_prefill_s:.2f}s (hf); first tokens agree: {paged.first == hf.first}")

    paged.run(cfg.warmup_steps)
    hf.run(cfg.warmup_steps)
    times: dict[str, list[float]] = {"paged": [], "hf": []}
    outputs: dict[str, list[list[int]]] = {}
    gc.collect()
    cpu = []
    for r in range(cfg.rounds):
        order = [("paged", paged), ("hf", hf)] if r % 2 == 0 else [("hf", hf), ("paged", paged)]
        with CpuMeter() as meter:
            for key, contender in order:
                t = time.perf_counter()
                outputs[key] = contender.run(cfg.steps)
                times[key].append(time.perf_counter() - t)
        cpu.append(meter.result)
        log(f"decode: round {r + 1}/{cfg.rounds}: paged {times['paged'][-1] / cfg.steps * 1e3:.1f} ms/step, "
            f"hf {times['hf'][-1] / cfg.steps * 1e3:.1f} ms/step; CPU {describe(meter.result)}")

    tokens = cfg.batch * cfg.steps * cfg.rounds
    result = {
        "config": asdict(cfg), "model": model_name, "torch_threads": threads,
        "paged_tok_s": tokens / sum(times["paged"]), "hf_tok_s": tokens / sum(times["hf"]),
        "paged_ms_per_step": [s / cfg.steps * 1e3 for s in times["paged"]],
        "hf_ms_per_step": [s / cfg.steps * 1e3 for s in times["hf"]],
        "paged_prefill_s": paged_prefill_s, "hf_prefill_s": hf_prefill_s,
        "first_tokens_agree": paged.first == hf.first, "cpu_per_round": cpu,
    }
    result["ratio"] = result["paged_tok_s"] / result["hf_tok_s"]
    result["greedy_agree_tokens"], result["greedy_total_tokens"] = _agreement(outputs["paged"], outputs["hf"])
    del paged, hf, paged_model, hf_model
    gc.collect()
    return result
