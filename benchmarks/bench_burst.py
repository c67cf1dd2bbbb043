"""A burst that the cluster can serve within the deadline is served, not refused: N concurrent
requests (4-token prompts, 500 output tokens, ignore_eos) against a running gateway. With
`dopd up --model tiny-random --prefill 1 --decode 1` (2048 KV blocks of 16: 63 such requests fit
at once) the rest wait in the gateway's decode queue (DOPD_DECODE_QUEUE_LIMIT).

    python benchmarks/bench_burst.py --target HOST:PORT [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from services.client import generate  # noqa: E402


async def one(channel, i: int) -> str:
    try:
        out = await generate(channel, [100 + i % 50, 200, 300, 400], max_tokens=500, temperature=0.0,
                             ignore_eos=True, timeout=600)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "ok" if out.completion_tokens == 500 else f"short ({out.completion_tokens} tokens)"


async def burst(target: str, n: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(channel, i) for i in range(n)))
    print(f"{n} concurrent requests: {dict(collections.Counter(results))} in {time.perf_counter() - start:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(burst(args.target, args.requests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
