"""Decode steps on the SDPA path (CPU), padded against ragged, for batches of alike and of mixed
contexts: what `paged_attention.ragged_decode` chooses between, and why.

    python benchmarks/bench_decode_ragged.py --model smollm2 --torch-threads 1

Each batch is timed three ways: forced padded (one masked SDPA call per layer, every request read
at the longest context), forced ragged (one call per request on its own context), and as the
runner chooses. Logits are compared between the two shapes (the largest absolute difference).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.modeling import paged_attention  # noqa: E402
from common.modeling.registry import RunnerSpec, build_runner  # noqa: E402

BATCHES = {  # name: contexts
    "1 x 512": [512],
    "4 x 512": [512] * 4,
    "16 x 512": [512] * 16,
    "16 x 1024": [1024] * 16,
    "8 x 300": [300] * 8,
    "7 x 300 + 1 x 2000": [300] * 7 + [2000],
    "14 x 200 + 2 x 2000": [200] * 14 + [2000] * 2,
    "mix of 16 (60-2000)": [60, 90, 120, 150, 180, 220, 260, 300, 350, 400, 500, 650, 800, 1100, 1500, 2000],
}
SHAPES = {"padded": float("inf"), "ragged": 0.0, "chosen": paged_attention.RAGGED_PADDING_FACTOR}


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    largest = max(len(c) for c in BATCHES.values())
    longest = max(max(c) for c in BATCHES.values())
    blocks_each = -(-longest // 16)
    runner = build_runner(RunnerSpec(args.model, kv_blocks=largest * blocks_each + 1, block_size=16)).runner
    store = runner.store
    layout = store.layout
    gen = torch.Generator().manual_seed(0)
    tables = [list(range(r * blocks_each, (r + 1) * blocks_each)) for r in range(largest)]
    for table in tables:  # random KV at the longest context, each request in its own blocks
        kv = torch.randn((layout.num_layers, 2, longest, layout.num_kv_heads, layout.head_dim), generator=gen) * 0.5
        store.write_chunk(0, store.slots(table, 0, longest), kv.to(layout.dtype))

    print(f"{args.model}, {torch.get_num_threads()} torch thread(s), median of {args.repeats} steps; "
          f"ragged when padding reads > {paged_attention.RAGGED_PADDING_FACTOR}x the batch's tokens")
    print(f"{'batch (contexts)':<22} {'padded ms':>10} {'ragged ms':>10} {'chosen':>8} {'chosen ms':>10} "
          f"{'max |logit diff|':>17}")
    for name, contexts in BATCHES.items():
        step = ([5] * len(contexts), [c - 1 for c in contexts],
                [t[:-(-c // 16)] for t, c in zip(tables, contexts, strict=False)])
        times, logits = {}, {}
        for shape, factor in SHAPES.items():
            paged_attention.RAGGED_PADDING_FACTOR = factor
            logits[shape] = runner.decode(*step)
            times[shape] = median_ms(lambda step=step: runner.decode(*step), args.repeats)
        chosen = "ragged" if paged_attention.ragged_decode(contexts) else "padded"
        diff = float((logits["padded"] - logits["ragged"]).abs().max())
        print(f"{name:<22} {times['padded']:>10.1f} {times['ragged']:>10.1f} {chosen:>8} {times['chosen']:>10.1f} "
              f"{diff:>17.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
