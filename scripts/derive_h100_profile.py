"""Derive the shipped latency profile common/profiles/llama3-8b-h100.json from first principles.

Llama-3-8B in bfloat16 on one H100 SXM; the constants below are explained, and set against
published figures and Microsoft Vidur's measured H100 kernel times (scripts/check_profile_vidur.py),
in common/profiles/README.md. Prints the profile; `--write` writes it, `--check` fails when the
shipped file differs from what this script derives.

    prefill(N) = T_PREFILL + smax(linear_flops(N) / (MFU_LINEAR * PEAK), (W + N * kv) / BW_WEIGHTS)
                 + attention_flops(N) / (MFU_ATTENTION * PEAK)
    decode(B, C) = T_DECODE + B * T_PER_SEQ + hypot(2 * P_DENSE * B / (MFU_DECODE * PEAK), W / BW_WEIGHTS)
                   + B * C * kv / BW_KV

smax(a, b) = (a^P + b^P)^(1/P) and hypot() (P = 2) are smooth maxima of the compute and memory times
of the same kernels: the larger one where one dominates, 2^(1/P) x it where they are equal (1.70x
for prefill's P = 1.3, 1.41x for hypot). The pre-recalibration profile (llama3-8b-h100-v1, frozen in
common/profiles/) had prefill(N) = T_PREFILL + hypot(all FLOPs / (0.50 * PEAK), (W + N * kv) / BW_WEIGHTS).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json)
LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB, MAX_CONTEXT = 32, 4096, 14336, 32, 8, 128, 128256, 8192
BYTES = 2  # bfloat16
P_LAYER = (HIDDEN * HEADS * HEAD_DIM * 2  # q, o
           + HIDDEN * KV_HEADS * HEAD_DIM * 2  # k, v
           + 3 * HIDDEN * INTERMEDIATE)  # gate, up, down
P_LAYERS = LAYERS * P_LAYER  # 6.98e9
P_HEAD = VOCAB * HIDDEN  # lm_head, untied (the embedding table is gathered, not streamed)
P_DENSE = P_LAYERS + P_HEAD  # weights every decode token multiplies through
W = P_DENSE * BYTES  # bytes streamed from HBM per forward: 15.0 GB
KV_PER_TOKEN = 2 * LAYERS * KV_HEADS * HEAD_DIM * BYTES  # 131072

# H100 SXM5 80 GB
PEAK = 989e12  # dense bf16 tensor FLOP/s
HBM = 3.35e12  # bytes/s, peak
BW_WEIGHTS = 2.8e12  # achievable when streaming weights (~84% of peak)
BW_KV = 2.5e12  # achievable for paged-attention KV reads (~75% of peak; gathers of 16-token blocks)
MFU_LINEAR = 0.66  # prefill linear layers with their norms/rope/activations/adds: Vidur's H100 kernels, 61-67%
P_PREFILL = 1.3  # prefill's smooth max: Vidur's H100 GEMMs between their memory and compute bounds fit p ~ 1.2-1.3
MFU_ATTENTION = 0.50  # prefill flash attention: between FlashAttention-2 (~35% on H100) and -3 (up to 75%)
MFU_DECODE = 0.50  # decode GEMMs at large batch (M = batch)
T_PREFILL = 3.0e-3  # per prefill forward: launches (no CUDA graph for varlen prefill), scheduling, sampling
T_DECODE = 2.0e-3  # per decode step with CUDA graphs: scheduling, input prep, sampling, launch
T_PER_SEQ = 10e-6  # per request per decode step: block tables, sampling, output handling on the CPU

PREFILL_TOKENS = [128, 256, 512, 1024, 2048, 4096, 8192, 16384]
DECODE_BATCH = [1, 2, 4, 8, 16, 32, 64, 128, 256]
DECODE_CONTEXT = [128, 512, 1024, 2048, 4096, 8192]


def prefill_seconds(total: int) -> float:
    """One forward over `total` prompt tokens, packed as prompts of at most MAX_CONTEXT tokens."""
    prompts = [MAX_CONTEXT] * (total // MAX_CONTEXT) + ([total % MAX_CONTEXT] if total % MAX_CONTEXT else [])
    linear = (2 * P_LAYERS * total + 2 * P_HEAD * len(prompts)) / (MFU_LINEAR * PEAK)  # lm_head: last tokens only
    memory = (W + total * KV_PER_TOKEN) / BW_WEIGHTS
    attention = sum(2 * LAYERS * HEADS * HEAD_DIM * n * n for n in prompts)  # causal QK^T and PV: 2*n^2*d per layer
    return T_PREFILL + (linear**P_PREFILL + memory**P_PREFILL) ** (1 / P_PREFILL) + attention / (MFU_ATTENTION * PEAK)


def decode_seconds(batch: int, context: int) -> float:
    """One step of `batch` requests that each attend over `context` tokens."""
    dense = math.hypot(2 * P_DENSE * batch / (MFU_DECODE * PEAK), W / BW_WEIGHTS)
    return T_DECODE + batch * T_PER_SEQ + dense + batch * context * KV_PER_TOKEN / BW_KV


def kv_capacity_tokens() -> int:
    """KV tokens that fit: 90% of 80 GiB less weights (16.1 GB with the embedding) and ~3 GB of activations."""
    usable = 0.9 * 80 * 2**30 - (P_DENSE + VOCAB * HIDDEN) * BYTES - 3e9
    return int(usable // KV_PER_TOKEN)


def profile() -> dict:
    capacity = kv_capacity_tokens()
    infeasible = [f"{b}x{c}" for b in DECODE_BATCH for c in DECODE_CONTEXT if b * c > capacity]
    return {
        "name": "llama3-8b-h100",
        "description": ("Llama-3-8B, bfloat16 weights and KV, on one H100 SXM 80 GB under a modern engine "
                        "(vLLM >= 0.6 / SGLang / TensorRT-LLM class: CUDA graphs for decode, flash attention). "
                        "Derived from first principles, prefill calibrated against Microsoft Vidur's measured H100 "
                        "kernel times (2026-12-07; the earlier profile is llama3-8b-h100-v1) and cross-checked "
                        "against published figures; see common/profiles/README.md."),
        "sources": [
            "microsoft/vidur at 7d47513363ec447a741ac5e47241580b47724fbf, data/profiling/compute/h100/meta-llama/"
            "Llama-2-7b-hf/mlp.csv and compute/a100/meta-llama/{Llama-2-7b-hf,Meta-Llama-3-8B}/mlp.csv: measured "
            "CUDA kernel times (ms, median of 20) of every op of a block but attention, 1-4096 tokens (A100 "
            "Llama-3-8B to 32768); Llama-3-8B on H100 = Llama-2-7B H100 time x the A100 ratio of the two models, "
            "per op and token count (scripts/check_profile_vidur.py; https://github.com/microsoft/vidur)",
            "Shah et al., 'FlashAttention-3: Fast and Accurate Attention with Asynchrony and Low-precision' "
            "(arXiv 2407.08608): FlashAttention-2 reaches ~35% of the H100's peak, FlashAttention-3 in FP16 up "
            "to 740 TFLOP/s (75%)",
            "NVIDIA/TensorRT-LLM docs/source/performance.md at 138f96d4, 'Low Latency' tables (from v0.5): "
            "LLaMA-7B batch-1 first-token latency, H100 FP8: 7 ms at 128 and 36 ms at 2048 input tokens; "
            "A100 FP16: 16 ms and 133 ms (https://github.com/NVIDIA/TensorRT-LLM/blob/"
            "138f96d45f90b9667426f7c47297d8c06bafac73/docs/source/performance.md)",
            "LambdaLabsML/vllm-benchmark results/prompt_10/1xH100-80GB-SXM/"
            "Meta-Llama-3-8B-Instruct_tp1_len2048.json (vLLM, Sept 2024, bf16, 10 requests at once; "
            "ITL = 10 x TPOT, i.e. 10 scheduler steps): median TPOT 7.56 ms, median ITL 72.3 ms (7.2 ms a step), "
            "TTFT 62 ms for 10 prompts of 1369 tokens in total (https://github.com/LambdaLabsML/vllm-benchmark)",
            "LambdaLabsML/vllm-benchmark benchmark_v0.md: Llama 3.1 8B, 1x H100, max-num-seqs 256, 5000 prompts: "
            "vLLM v0.6.0 with 10 scheduler steps 8088 output tok/s, median TPOT 25.57 ms, median ITL 243.76 ms "
            "(24.4 ms a step); v0.5.4 3032 tok/s, median TPOT 64.06 ms",
            "NVIDIA NIM LLM benchmarking guide, Performance (https://docs.nvidia.com/nim/benchmarking/llm/1.0.0/"
            "performance): Llama-3.1-8b-instruct NIM 1.8.0 (the page's GPUs are H100 80G): ITL 4.63 ms at "
            "concurrency 1, 7.57 ms at 100, 16.14 ms at 250; TTFT 10.26 ms at concurrency 1 (TensorRT-LLM; "
            "FP8 by the figures, as 4.63 ms is below the bf16 weight-read floor)",
            "vLLM blog, 'vLLM v0.6.0: 2.7x Throughput Improvement and 5x Latency Reduction' "
            "(https://blog.vllm.ai/2024/09/05/perf-update.html): CPU-side overhead dominated Llama 3 8B on one "
            "H100 before v0.6.0",
        ],
        "assumptions": [
            f"Llama-3-8B: {P_LAYERS / 1e9:.2f}e9 layer params + {P_HEAD / 1e6:.0f}e6 lm_head; "
            f"{W / 1e9:.1f} GB of weights streamed per forward; KV {KV_PER_TOKEN} bytes per token (bf16)",
            f"H100 SXM: {PEAK / 1e12:.0f} TFLOP/s dense bf16 peak, {HBM / 1e12:.2f} TB/s HBM peak; achievable "
            f"{BW_WEIGHTS / 1e12:.1f} TB/s streaming weights, {BW_KV / 1e12:.1f} TB/s reading paged KV",
            f"prefill(N) = {T_PREFILL * 1e3:.0f} ms + smax(linear FLOPs / ({MFU_LINEAR:.0%} of peak), "
            f"(weights + N*kv) / {BW_WEIGHTS / 1e12:.1f} TB/s) + attention FLOPs / ({MFU_ATTENTION:.0%} of peak); "
            f"smax(a, b) = (a^{P_PREFILL:g} + b^{P_PREFILL:g})^(1/{P_PREFILL:g}); linear FLOPs = 2*P_layers*N + "
            f"lm_head per prompt; attention FLOPs = causal 2*L*H*d*n^2 per prompt; N > {MAX_CONTEXT} is packed "
            f"as prompts of {MAX_CONTEXT}",
            f"prefill's {MFU_LINEAR:.0%} and smax exponent {P_PREFILL:g} fit Vidur's measured H100 linear layers "
            f"(GEMMs, norms, rope, activation, residual add: 63-67% of peak at 1024, 2048 and 4096 tokens, "
            f"a median 61% over the token counts between); attention at "
            f"{MFU_ATTENTION:.0%} is an estimate (Vidur's attention.csv was not available)",
            f"decode(B, C) = {T_DECODE * 1e3:.0f} ms + B*{T_PER_SEQ * 1e6:.0f} us + hypot(2*P*B / "
            f"({MFU_DECODE:.0%} of peak), weights / {BW_WEIGHTS / 1e12:.1f} TB/s) + B*C*kv / {BW_KV / 1e12:.1f} TB/s",
            "fixed costs are those of an engine with CUDA graphs and multi-step or overlapped scheduling "
            "(vLLM >= 0.6, SGLang, TensorRT-LLM); vLLM <= 0.5 measured 2-3x slower steps on the same GPU",
            f"about {capacity // 1000}k KV tokens fit in 80 GB (90% utilisation, less weights and activations); "
            f"decode points with batch x context beyond that ({', '.join(infeasible)}) cannot run on one H100 "
            f"and are the formula's extrapolation, kept so interpolation stays smooth",
            "prefill tokens are the forward's total; TTFT as a client sees it adds queueing, tokenization and "
            "HTTP on top",
        ],
        "model": {"num_layers": LAYERS, "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16",
                  "vocab_size": VOCAB, "max_context": MAX_CONTEXT},
        "prefill": {"tokens": PREFILL_TOKENS, "seconds": [round(prefill_seconds(n), 5) for n in PREFILL_TOKENS]},
        "decode": {"batch": DECODE_BATCH, "context": DECODE_CONTEXT,
                   "seconds": [[round(decode_seconds(b, c), 5) for c in DECODE_CONTEXT] for b in DECODE_BATCH]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write common/profiles/llama3-8b-h100.json")
    parser.add_argument("--check", action="store_true", help="fail if the shipped file differs")
    args = parser.parse_args()
    text = json.dumps(profile(), indent=2) + "\n"
    target = Path(__file__).resolve().parent.parent / "common" / "profiles" / "llama3-8b-h100.json"
    if args.check:
        if not target.exists() or target.read_text() != text:
            print(f"{target} is not what {Path(__file__).name} derives; run it with --write", file=sys.stderr)
            return 1
        return 0
    if args.write:
        target.write_text(text)
        print(f"wrote {target}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
