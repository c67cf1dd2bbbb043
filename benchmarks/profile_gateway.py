"""Where a streamed token's gateway CPU goes (issue 26, item 1): the sim engine's zero-cost
profile (no compute), 1 prefill + 1 decode worker, one gateway; an open-loop token stream
(128-token prompts, 256 output tokens a request) through the gRPC API or the OpenAI HTTP API,
while py-spy samples the gateway process (its own threads: the event loop and gRPC's).

Prints the gateway's CPU seconds per 1,000 streamed tokens over the sampled window, then where the
samples fell: by the frame's package (grpc, asyncio, protobuf, the gateway's modules, ...) as the
innermost frame of ours or of a library, and the functions with the most samples, self and
inclusive. `--out DIR` keeps the raw (collapsed) stacks and the figures.

    python benchmarks/profile_gateway.py [--front grpc|http] [--rate 15] [--seconds 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.bench_http_vs_grpc import cpu_seconds  # noqa: E402
from benchmarks.bench_overhead import open_loop  # noqa: E402
from benchmarks.sim_cluster import running_cluster  # noqa: E402

MODEL = "sim:zero"
OUTPUT_TOKENS = 256


def where(frame: str) -> str:
    """The bucket of a frame `func (path:line)`: our module, the library it is in, or, where the
    innermost Python frame is the event loop's run or a thread's, native code below Python (the
    event loop, gRPC's core and its Cython layer: py-spy sees into them with --native only)."""
    path = frame.rsplit("(", 1)[-1]
    if "asyncio/runners.py" in path or "uvloop/" in path:
        return "native, under the event loop (uvloop, gRPC core)"
    if "threading.py" in path:
        return "native, in other threads (gRPC core's)"
    if path.startswith("<string>"):
        return "generated code (dataclass __init__)"
    if path.startswith("<frozen"):
        return "the interpreter's own modules (abc, ...)"
    if ".py" not in path:
        return "native: " + frame.split(" (")[0][:60]
    for ours in ("services/gateway/", "services/", "common/"):
        if ours in path:
            return path.split(ours, 1)[1].split(":")[0] if ours == "services/gateway/" else ours.strip("/")
    for lib in ("grpc", "asyncio", "google/protobuf", "uvloop", "tokenizers", "transformers", "starlette",
                "fastapi", "uvicorn", "h11", "httptools", "pydantic", "prometheus_client", "json"):
        if f"/{lib}/" in path or path.startswith(f"{lib}/") or path.startswith(f"{lib}."):
            return lib
    return "other"


def summarize(collapsed: Path, top: int) -> dict:
    """Samples by bucket (the innermost frame's) and by function, self and inclusive."""
    by_bucket, self_time, inclusive, total = Counter(), Counter(), Counter(), 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        n = int(count)
        total += n
        by_bucket[where(frames[-1])] += n
        self_time[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    return {"samples": total, "by_bucket": by_bucket.most_common(), "self": self_time.most_common(top),
            "inclusive": inclusive.most_common(top)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--front", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--rate", type=float, default=15.0, help="requests/s (256 output tokens each)")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long py-spy samples")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--native", action="store_true", help="py-spy --native: C frames too")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="dopd-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    console = Console(width=180)
    with running_cluster(MODEL, prefill=1, decode=1, kv_blocks=8192) as cluster:
        pid = cluster.proc("gateway").popen.pid
        kw = {} if args.front == "grpc" else {"backend": "openai", "base_url": cluster.http_url, "model": MODEL}
        open_loop(cluster.gateway_address, 10, 1, 16, seed=99, **kw)  # warm-up
        load: dict = {}
        runner = threading.Thread(target=lambda: load.update(open_loop(
            cluster.gateway_address, args.rate, args.seconds + 2, OUTPUT_TOKENS, seed=1, **kw)))
        runner.start()
        time.sleep(1.0)  # into the steady stream
        cpu0 = cpu_seconds(pid)
        subprocess.run([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--duration",
                        str(int(args.seconds)), "--rate", "200", "--format", "raw", "--threads",
                        "--output", str(out / "stacks.txt"),
                        # --native pauses the process for each sample (it unwinds C stacks); the
                        # figures of CPU per token then include that.
                        *(["--native"] if args.native else ["--nonblocking"])],
                       check=True, capture_output=True)
        cpu = cpu_seconds(pid) - cpu0
        runner.join()
    tokens_per_s = load["output_throughput"]
    figures = {"front": args.front, "rate": args.rate, "seconds": args.seconds, "gateway_cpu_s": cpu,
               "tokens_per_s": tokens_per_s,
               "gateway_cpu_s_per_1k_tokens": 1000 * cpu / (tokens_per_s * args.seconds) if tokens_per_s else None,
               **summarize(out / "stacks.txt", args.top)}
    (out / "profile.json").write_text(json.dumps(figures, indent=2))
    console.print(f"{args.front}: {tokens_per_s:.0f} tokens/s streamed; the gateway used {cpu:.2f} CPU-s in "
                  f"{args.seconds:g} s sampled: {figures['gateway_cpu_s_per_1k_tokens']:.3f} CPU-s per 1,000 tokens")
    total = figures["samples"] or 1
    table = Table(title="gateway samples by where the innermost frame is")
    table.add_column("where")
    table.add_column("share", justify="right")
    for bucket, n in figures["by_bucket"]:
        table.add_row(bucket, f"{n / total:.1%}")
    console.print(table)
    for key, title in (("self", "functions by self samples"), ("inclusive", "functions by inclusive samples")):
        table = Table(title=title)
        table.add_column("function (file:line)")
        table.add_column("share", justify="right")
        for frame, n in figures[key]:
            table.add_row(frame[:150], f"{n / total:.1%}")
        console.print(table)
    console.print(f"raw stacks and figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
