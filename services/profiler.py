"""`dopd profile`: measure a latency profile (common/profile.py format) on the real engine.

Prefill: one forward of ModelRunner.prefill over a prompt of N random tokens (N above the model's
max_context is packed as several prompts of at most max_context tokens each, which is what the
profile's "total prompt tokens" means), median of `repeats` after one warm-up.

Decode: `batch` requests whose block tables each hold `context` tokens of random KV, written once
into distinct blocks of a PagedKVStore sized for the largest batch x context; one step puts each
request's new token at position context - 1 (so context_lens == context, as SimRunner reads
it). Median of max(3, repeats) steps after one warm-up.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

QUICK_GRID = {"prefill_tokens": [16, 128, 512], "decode_batches": [1, 4, 16], "decode_contexts": [128, 512]}
DEFAULT_GRID = {"prefill_tokens": [16, 64, 128, 256, 512, 1024], "decode_batches": [1, 2, 4, 8, 16, 32],
                "decode_contexts": [128, 256, 512, 1024]}
LOADED_MACHINE = 1.5  # a 1-minute load average above this is recorded as "measured under load"


def _model_label(model_name: str) -> str:
    return Path(model_name).name if "/" in model_name else model_name


def _blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def measure_profile(model_name: str, prefill_tokens: list[int], decode_batches: list[int],
                    decode_contexts: list[int], repeats: int, device: str = "auto", threads: int = 0,
                    *, name: str | None = None, dtype: str = "float32", block_size: int = 0, seed: int = 0,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Measure prefill and decode step times of `model_name` on this machine; return a profile dict.

    threads > 0 sets torch's thread count for the whole process. The result loads with
    LatencyProfile.from_dict; its name defaults to <model>-<device type>[<torch threads> on CPU].
    """
    import torch

    from common.kv.block_pool import choose_block_size
    from common.kv.kv_store import PagedKVStore
    from common.kv.layout import dtype_from_name
    from common.modeling.loader import load_model
    from common.modeling.runner import ModelRunner, kv_layout

    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for label, xs in (("prefill_tokens", prefill_tokens), ("decode_batches", decode_batches),
                      ("decode_contexts", decode_contexts)):
        if not xs or list(xs) != sorted(set(xs)) or xs[0] < 1:
            raise ValueError(f"{label} must be non-empty, positive and strictly increasing")
    say = progress or (lambda msg: None)
    if threads > 0:
        torch.set_num_threads(threads)
    load_start = os.getloadavg()[0]

    say(f"loading {model_name}")
    loaded = load_model(model_name, device, dtype_from_name(dtype))
    block_size = choose_block_size(block_size, loaded.attention == "flash_attention_2")  # 0: as a worker's
    config = loaded.config
    layout = kv_layout(loaded)
    max_context = int(config.max_position_embeddings)
    if decode_contexts[-1] > max_context:
        raise ValueError(f"decode context {decode_contexts[-1]} is beyond the model's max_context {max_context}")
    blocks_per_request = _blocks_for(decode_contexts[-1], block_size)
    num_blocks = decode_batches[-1] * blocks_per_request
    say(f"allocating {num_blocks} KV blocks ({layout.bytes_for(num_blocks * block_size) / 2**20:.0f} MiB)")
    store = PagedKVStore(layout, num_blocks, block_size, loaded.device)
    runner = ModelRunner(loaded, store)
    gen = torch.Generator().manual_seed(seed)
    vocab = int(config.vocab_size)

    def sync() -> None:
        if loaded.device.type == "cuda":
            torch.cuda.synchronize(loaded.device)

    def timed(fn: Callable[[], object], n: int) -> float:
        fn()  # warm-up: allocator, kernel selection, caches
        times = []
        for _ in range(n):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    prefill_seconds = []
    for total in prefill_tokens:
        num_prompts = _blocks_for(total, max_context)
        lens = [total // num_prompts + (1 if i < total % num_prompts else 0) for i in range(num_prompts)]
        prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]
        seconds = timed(lambda prompts=prompts: runner.prefill(prompts, None), repeats)
        prefill_seconds.append(seconds)
        say(f"prefill {total} tokens: {seconds * 1e3:.1f} ms")

    # Random KV for every request at the largest context, each in its own blocks, written once.
    tables = [list(range(r * blocks_per_request, (r + 1) * blocks_per_request)) for r in range(decode_batches[-1])]
    kv_shape = (layout.num_layers, 2, decode_contexts[-1], layout.num_kv_heads, layout.head_dim)
    for table in tables:
        kv = (torch.randn(kv_shape, generator=gen) * 0.5).to(layout.dtype)
        store.write_chunk(0, store.slots(table, 0, decode_contexts[-1]), kv)

    steps = max(3, repeats)
    decode_seconds = []
    for batch in decode_batches:
        row = []
        for context in decode_contexts:
            tokens = torch.randint(0, vocab, (batch,), generator=gen).tolist()
            positions = [context - 1] * batch
            block_tables = [t[:_blocks_for(context, block_size)] for t in tables[:batch]]
            seconds = timed(lambda tokens=tokens, positions=positions, block_tables=block_tables:
                            runner.decode(tokens, positions, block_tables), steps)
            row.append(seconds)
            say(f"decode batch {batch} x context {context}: {seconds * 1e3:.1f} ms")
        decode_seconds.append(row)

    load_end = os.getloadavg()[0]
    dev = loaded.device
    threads_used = torch.get_num_threads()
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    label = _model_label(model_name)
    load = max(load_start, load_end)
    description = (f"{label} ({dtype}, attention {loaded.attention}) on {where}, {os.cpu_count()} CPUs, "
                   f"{threads_used} torch threads, device {dev}, measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC "
                   f"by dopd profile")
    if load > LOADED_MACHINE:
        description += (f"; measured under load (1-min load average {load_start:.2f} at start, {load_end:.2f} at "
                        f"end): times may be inflated and noisy")
    return {
        "name": name or f"{label}-{dev.type}{threads_used if dev.type == 'cpu' else ''}",
        "description": description,
        "sources": ["measured by dopd profile"],
        "assumptions": [
            f"torch {torch.__version__}, {dtype} weights and KV, attention kernel {loaded.attention}",
            f"prefill: one prompt of N random tokens (split into prompts of <= {max_context} tokens when N is "
            f"larger), median of {repeats} forwards after one warm-up",
            f"decode: batch requests all at the same context, random KV in distinct {block_size}-token blocks, "
            f"median of {steps} steps after one warm-up; a step includes building block tables and the "
            f"logits of the batch, not sampling",
            f"1-min load average {load_start:.2f} at start, {load_end:.2f} at end",
        ],
        "model": {"num_layers": layout.num_layers, "num_kv_heads": layout.num_kv_heads,
                  "head_dim": layout.head_dim, "dtype": layout.dtype_name, "vocab_size": vocab,
                  "max_context": max_context},
        "prefill": {"tokens": list(prefill_tokens), "seconds": [round(s, 6) for s in prefill_seconds]},
        "decode": {"batch": list(decode_batches), "context": list(decode_contexts),
                   "seconds": [[round(s, 6) for s in row] for row in decode_seconds]},
    }


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_profile_parser(subparsers) -> None:
    p = subparsers.add_parser("profile", help="measure a latency profile of a model on this machine")
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny-random | a local HF model directory")
    p.add_argument("--out", help="where the profile JSON goes (default profile-<model>.json)")
    p.add_argument("--quick", action="store_true", help="a small grid (a minute or so on 2 CPU cores)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per grid point (median)")
    p.add_argument("--list", action="store_true", help="list the shipped profiles and exit")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--name", help="the profile's name (default <model>-<device>)")
    p.add_argument("--prefill-tokens", type=_int_list, help="comma-separated prompt token counts")
    p.add_argument("--batches", type=_int_list, help="comma-separated decode batch sizes")
    p.add_argument("--contexts", type=_int_list, help="comma-separated decode contexts")
    p.set_defaults(func=run_profile)


def _list_profiles() -> int:
    from common.profile import list_profiles, load_profile

    for profile_name in list_profiles():
        try:
            description = load_profile(profile_name).description
        except (ValueError, OSError) as exc:
            description = f"(unreadable: {exc})"
        print(f"{profile_name}\t{description}")
    return 0


def run_profile(args) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from common.profile import LatencyProfile

    if args.list:
        return _list_profiles()
    console = Console(stderr=True, width=160)
    grid = dict(QUICK_GRID if args.quick else DEFAULT_GRID)
    for key, value in (("prefill_tokens", args.prefill_tokens), ("decode_batches", args.batches),
                       ("decode_contexts", args.contexts)):
        if value:
            grid[key] = sorted(set(value))
    out = Path(args.out or f"profile-{_model_label(args.model)}.json")
    try:
        with console.status(f"profiling {args.model}") as status:
            doc = measure_profile(args.model, repeats=args.repeats, device=args.device, threads=args.threads,
                                  name=args.name, progress=lambda msg: status.update(f"profiling: {msg}"), **grid)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        console.print(f"[red]profile failed: {exc}")
        return 1
    LatencyProfile.from_dict(doc)  # what we write must load
    out.write_text(json.dumps(doc, indent=2) + "\n")

    prefill = Table(title=f"prefill: {doc['name']}")
    for col in ("prompt tokens", "seconds", "tokens/s"):
        prefill.add_column(col, justify="right")
    for tokens, seconds in zip(doc["prefill"]["tokens"], doc["prefill"]["seconds"], strict=True):
        prefill.add_row(str(tokens), f"{seconds:.4f}", f"{tokens / seconds:.0f}" if seconds > 0 else "-")
    decode = Table(title="decode step seconds (batch x context)")
    decode.add_column("batch", justify="right")
    for context in doc["decode"]["context"]:
        decode.add_column(f"ctx {context}", justify="right")
    for batch, row in zip(doc["decode"]["batch"], doc["decode"]["seconds"], strict=True):
        decode.add_row(str(batch), *(f"{s:.4f}" for s in row))
    out_console = Console(width=160)
    out_console.print(prefill)
    out_console.print(decode)
    out_console.print(doc["description"])
    print(f"wrote {out}", file=sys.stderr)
    return 0
