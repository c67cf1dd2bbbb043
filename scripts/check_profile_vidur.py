"""Check the llama3-8b-h100 latency profile against Microsoft Vidur's measured H100 kernel times.

Vidur (https://github.com/microsoft/vidur) measured, on real GPUs, every operation of one transformer
block but attention, for many token counts: data/profiling/compute/<device>/<model>/mlp.csv. It has
H100 files for Llama-2-7B but not for Llama-3-8B, and A100 files for both. So the Llama-3-8B H100
time of each operation is taken as

    H100 Llama-2-7B time x (A100 Llama-3-8B time / A100 Llama-2-7B time)      (same op, same tokens)

which carries the H100's measured efficiency over to Llama-3-8B's shapes (GQA's narrower QKV
projection, the wider MLP). The rest of a forward is estimated, as printed below the tables.

    python scripts/check_profile_vidur.py VIDUR [--profiles a,b] [--attn-mfu 0.5]

VIDUR is a Vidur git directory (a clone, or a bare mirror; read with `git show`, at --commit,
default HEAD), a Vidur checkout, or a folder holding compute/<device>/meta-llama/<model>/mlp.csv
(Vidur's data/profiling layout). Needed: compute/h100/meta-llama/Llama-2-7b-hf/mlp.csv and
compute/a100/meta-llama/{Llama-2-7b-hf,Meta-Llama-3-8B}/mlp.csv (2.6 MB together).

The CSV columns, as Vidur writes them (vidur/profiling/mlp/*.py, vidur/profiling/utils/
record_function_tracer.py) and reads them (vidur/execution_time_predictor/
sklearn_execution_time_predictor.py): one row per (num_tokens, num_tensor_parallel_workers) with
the model's shape (n_head, n_kv_head, n_embd, n_expanded_embd, vocab_size, use_gated_mlp) and,
for each operation, `time_stats.<op>.{min,max,mean,median,std}`: **milliseconds** of CUDA kernel
time (the kernels launched inside the op's record_function region, summed; CPU launch gaps not
included) for one layer, over 20 repetitions of the block, fp16. Vidur's predictor uses `.median`,
so does this script, with one tensor-parallel worker. Operations of a layer: input_layernorm,
attn_pre_proj (the fused QKV GEMM), attn_rope, attn_post_proj (the O GEMM),
post_attention_layernorm, mlp_up_proj (the fused gate and up GEMM), mlp_act (SiLU and multiply),
mlp_down_proj, add (a residual add); emb (the embedding gather) runs once a forward.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

LAYER_OPS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
             "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
OPS = (*LAYER_OPS, "emb")
FILES = {  # key: (path under data/profiling, expected n_head, n_kv_head, n_embd, n_expanded_embd)
    "h100-llama2": ("compute/h100/meta-llama/Llama-2-7b-hf/mlp.csv", (32, 32, 4096, 11008)),
    "a100-llama2": ("compute/a100/meta-llama/Llama-2-7b-hf/mlp.csv", (32, 32, 4096, 11008)),
    "a100-llama3": ("compute/a100/meta-llama/Meta-Llama-3-8B/mlp.csv", (32, 8, 4096, 14336)),
}

# Llama-3-8B and the H100, as scripts/derive_h100_profile.py has them.
LAYERS, HIDDEN, HEADS, HEAD_DIM, VOCAB, MAX_CONTEXT = 32, 4096, 32, 128, 128256, 8192
P_LAYERS = LAYERS * (HIDDEN * HEADS * HEAD_DIM * 2 + HIDDEN * 8 * HEAD_DIM * 2 + 3 * HIDDEN * 14336)
KV_PER_TOKEN = 2 * LAYERS * 8 * HEAD_DIM * 2
PEAK = 989e12
LLAMA2_UP_WIDTH = 2 * 11008  # mlp_up_proj's output width in the Llama-2-7B file (gate and up fused)
GEMMS = {"attn_pre_proj": (HIDDEN, 6144), "attn_post_proj": (HIDDEN, HIDDEN), "mlp_up_proj": (HIDDEN, 2 * 14336),
         "mlp_down_proj": (14336, HIDDEN)}  # Llama-3-8B's (in, out) features

PREFILL_TOKENS = (128, 256, 512, 1024, 2048, 4096, 8192)
BANDS = ((1, 127), (128, 511), (512, 1023), (1024, 4096))  # every token count Vidur measured in each
DECODE_POINTS = ((1, 128), (1, 4096), (8, 512), (16, 512), (32, 1024), (64, 2048), (128, 1024), (256, 512),
                 (256, 1024))


def read_csv(source: Path, rel: str, commit: str) -> str:
    if (source / "objects").is_dir() or (source / ".git").exists():  # a git directory: read at `commit`
        return subprocess.run(["git", "-C", str(source), "show", f"{commit}:data/profiling/{rel}"], check=True,
                              capture_output=True, text=True).stdout
    for base in (source, source / "data" / "profiling"):
        if (base / rel).exists():
            return (base / rel).read_text()
    raise FileNotFoundError(f"{rel} not found under {source}")


def load_times(text: str, shape: tuple[int, int, int, int]) -> dict[int, dict[str, float]]:
    """{num_tokens: {op: median ms}} for one tensor-parallel worker; rows repeated for a token count
    are averaged (Vidur keeps them all as training points)."""
    rows: dict[int, list[dict[str, float]]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        if int(row["num_tensor_parallel_workers"]) != 1:
            continue
        got = (int(row["n_head"]), int(row["n_kv_head"]), int(row["n_embd"]), int(row["n_expanded_embd"]))
        if got != shape:
            raise ValueError(f"unexpected model shape {got}, expected {shape}")
        rows.setdefault(int(row["num_tokens"]), []).append(
            {op: float(row[f"time_stats.{op}.median"] or 0.0) for op in OPS})
    return {n: {op: sum(r[op] for r in rs) / len(rs) for op in OPS} for n, rs in sorted(rows.items())}


class Implied:
    """Llama-3-8B on an H100, in seconds, from the three files; attention at `attn_mfu` of peak."""

    def __init__(self, times: dict[str, dict[int, dict[str, float]]], attn_mfu: float, bw_kv: float) -> None:
        self.h2, self.a2, self.a3 = times["h100-llama2"], times["a100-llama2"], times["a100-llama3"]
        self.top = max(set(self.h2) & set(self.a2) & set(self.a3))  # 4096: the Llama-2 files end there
        self.attn_mfu, self.bw_kv = attn_mfu, bw_kv

    def op_ms(self, op: str, n: int) -> float:
        """One call of `op` over n tokens, Llama-3-8B on H100, ms. Beyond the files' last token count,
        linear from it (GEMMs of M >= 4096 rows and elementwise kernels scale with the rows)."""
        if n > self.top:
            return self.op_ms(op, self.top) * n / self.top
        if n not in self.h2:
            raise ValueError(f"{n} tokens not in the Vidur grid")
        a2 = self.a2[n][op]
        return self.h2[n][op] * (self.a3[n][op] / a2 if a2 > 0 else 1.0)

    def layers_s(self, n: int) -> float:
        return LAYERS * sum(self.op_ms(op, n) for op in LAYER_OPS) / 1e3

    def lm_head_s(self, m: int) -> float:
        """The lm_head over m tokens: Vidur's H100 mlp_up_proj GEMM (K = 4096) at m tokens, widened
        from 22016 to 128256 outputs."""
        return self.h2[m]["mlp_up_proj"] * VOCAB / LLAMA2_UP_WIDTH / 1e3

    def others_s(self, n: int) -> float:
        """Once a forward: the final norm and the embedding gather."""
        return (self.op_ms("input_layernorm", n) + self.op_ms("emb", n)) / 1e3

    def prefill_parts(self, total: int) -> dict[str, float]:
        prompts = [MAX_CONTEXT] * (total // MAX_CONTEXT) + ([total % MAX_CONTEXT] if total % MAX_CONTEXT else [])
        attn_flops = sum(2 * LAYERS * HEADS * HEAD_DIM * n * n for n in prompts)  # causal QK^T and PV
        return {"layers": self.layers_s(total), "attention": attn_flops / (self.attn_mfu * PEAK),
                "kv_write": total * KV_PER_TOKEN / self.bw_kv, "lm_head": self.lm_head_s(len(prompts)),
                "norm_emb": self.others_s(total)}

    def decode_parts(self, batch: int, context: int) -> dict[str, float]:
        return {"layers": self.layers_s(batch), "attention": batch * context * KV_PER_TOKEN / self.bw_kv,
                "lm_head": self.lm_head_s(batch), "norm_emb": self.others_s(batch)}

    def smax_error(self, p: float, bw: float, tokens: list[int]) -> tuple[float, float]:
        """How well (compute^p + memory^p)^(1/p) gives the four GEMMs' summed time at each token count,
        compute at each GEMM's own measured efficiency at the files' last token count, memory = its
        bytes (weights, input, output) at `bw`: median and mean of log(model / measured)."""
        eff = {op: 2 * self.top * k * m / (self.op_ms(op, self.top) / 1e3) for op, (k, m) in GEMMS.items()}
        errors = []
        for n in tokens:
            model = sum(((2 * n * k * m / eff[op]) ** p + ((k * m + n * (k + m)) * 2 / bw) ** p) ** (1 / p)
                        for op, (k, m) in GEMMS.items())
            errors.append(math.log(model / (sum(self.op_ms(op, n) for op in GEMMS) / 1e3)))
        return statistics.median(errors), statistics.fmean(errors)

    def layer_mfu(self, n: int) -> float:
        """Layer FLOPs over the measured layer time (GEMMs and the elementwise ops), as a share of peak."""
        return 2 * P_LAYERS * n / self.layers_s(n) / PEAK


def load_derivation():
    import importlib.util
    spec = importlib.util.spec_from_file_location("derive_h100_profile", REPO / "scripts" / "derive_h100_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vidur", type=Path, help="Vidur git directory, checkout, or a folder holding compute/...")
    parser.add_argument("--commit", default="HEAD", help="when VIDUR is a git directory (default HEAD)")
    parser.add_argument("--profiles", default="llama3-8b-h100-v1,llama3-8b-h100",
                        help="shipped profiles to compare, comma-separated (missing ones are skipped)")
    parser.add_argument("--attn-mfu", type=float, default=0.50,
                        help="prefill flash attention's share of the dense bf16 peak (default 0.50)")
    parser.add_argument("--attn-range", default="0.35,0.75",
                        help="low,high attention shares for the range column (FlashAttention-2 / -3 on H100)")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from common.profile import PROFILE_DIR, load_profile

    derive = load_derivation()
    times = {key: load_times(read_csv(args.vidur, rel, args.commit), shape) for key, (rel, shape) in FILES.items()}
    names = [n for n in args.profiles.split(",") if (PROFILE_DIR / f"{n}.json").exists()]
    profiles = [load_profile(n) for n in names]
    bw_kv = derive.BW_KV
    implied = Implied(times, args.attn_mfu, bw_kv)
    lo, hi = (Implied(times, float(x), bw_kv) for x in args.attn_range.split(","))
    if args.vidur.is_dir() and ((args.vidur / "objects").is_dir() or (args.vidur / ".git").exists()):
        commit = subprocess.run(["git", "-C", str(args.vidur), "rev-parse", args.commit], check=True,
                                capture_output=True, text=True).stdout.strip()
        print(f"Vidur data at commit {commit}")
    t_prefill, t_decode, t_seq = derive.T_PREFILL, derive.T_DECODE, derive.T_PER_SEQ

    print(f"\nPrefill, one forward over N prompt tokens (ms). Vidur-implied = {t_prefill * 1e3:g} ms fixed (the "
          f"profile's) + measured layers + estimated attention at {args.attn_mfu:.0%} of peak + KV write + lm_head "
          f"+ final norm and embedding; range: attention at {args.attn_range.replace(',', '-')} of peak.")
    head = ["N", "layers", "attn", "rest", "Vidur-implied", "range", "layer MFU"]
    head += [f"{n}" for n in names] + [f"{n} / Vidur" for n in names]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for n in PREFILL_TOKENS:
        parts = implied.prefill_parts(n)
        total = t_prefill + sum(parts.values())
        bounds = [t_prefill + sum(x.prefill_parts(n).values()) for x in (hi, lo)]
        rest = parts["kv_write"] + parts["lm_head"] + parts["norm_emb"]
        cells = [str(n), f"{parts['layers'] * 1e3:.1f}", f"{parts['attention'] * 1e3:.1f}", f"{rest * 1e3:.1f}",
                 f"{total * 1e3:.1f}", f"{bounds[0] * 1e3:.1f}-{bounds[1] * 1e3:.1f}", f"{implied.layer_mfu(n):.0%}"]
        cells += [f"{p.prefill_time(n) * 1e3:.1f}" for p in profiles]
        cells += [f"{p.prefill_time(n) / total:.2f}" for p in profiles]
        print("| " + " | ".join(cells) + " |")

    print("\nThe same ratio (profile, interpolated as the simulator does, / Vidur-implied) over every token count "
          "the Vidur files hold in each band: median [min, max]. Measured GEMM times are a staircase in the token "
          "count (tile and wave quantization), and powers of two sit at the bottom of its steps.")
    head = ["tokens", "counts", "layer MFU"] + [f"{n} / Vidur" for n in names]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for lo_n, hi_n in BANDS:
        counts = [n for n in sorted(implied.h2) if lo_n <= n <= hi_n]
        vidur = {n: t_prefill + sum(implied.prefill_parts(n).values()) for n in counts}
        mfu = [implied.layer_mfu(n) for n in counts]
        cells = [f"{lo_n}-{hi_n}", str(len(counts)), f"{statistics.median(mfu):.0%} [{min(mfu):.0%}, {max(mfu):.0%}]"]
        for p in profiles:
            r = [p.prefill_time(n) / vidur[n] for n in counts]
            cells.append(f"{statistics.median(r):.2f} [{min(r):.2f}, {max(r):.2f}]")
        print("| " + " | ".join(cells) + " |")

    tokens = [n for n in sorted(implied.h2) if n <= 2048]
    print(f"\nThe smooth max of compute and memory time, (c^p + m^p)^(1/p), against the four GEMMs of a layer "
          f"at each of the {len(tokens)} token counts from 1 to 2048 (compute at each GEMM's own efficiency at "
          f"{implied.top} tokens, memory at {derive.BW_WEIGHTS / 1e12:g} TB/s): median and mean of log(model / "
          f"measured), 0 = no bias.")
    for p in (1.2, 1.3, 1.5, 2.0):
        median, mean = implied.smax_error(p, derive.BW_WEIGHTS, tokens)
        print(f"  p = {p:g}: {median:+.3f} median, {mean:+.3f} mean")

    print(f"\nDecode step, B requests at context C (ms). Vidur-implied = the profile's fixed {t_decode * 1e3:g} ms + "
          f"B x {t_seq * 1e6:g} us + measured layers at B tokens + lm_head at B tokens + final norm and embedding "
          f"+ paged-attention KV read at {bw_kv / 1e12:g} TB/s (the profile's own figure: Vidur's attention.csv is "
          f"not used).")
    head = ["B", "C", "layers", "attn", "Vidur GPU", "Vidur-implied"]
    head += [f"{n}" for n in names] + [f"{n} / Vidur" for n in names]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for b, c in DECODE_POINTS:
        parts = implied.decode_parts(b, c)
        gpu = sum(parts.values())
        total = t_decode + b * t_seq + gpu
        cells = [str(b), str(c), f"{parts['layers'] * 1e3:.2f}", f"{parts['attention'] * 1e3:.2f}",
                 f"{gpu * 1e3:.2f}", f"{total * 1e3:.2f}"]
        cells += [f"{p.decode_step_time(b, c) * 1e3:.2f}" for p in profiles]
        cells += [f"{p.decode_step_time(b, c) / total:.2f}" for p in profiles]
        print("| " + " | ".join(cells) + " |")

    a3 = times["a100-llama3"]
    if 8192 in a3 and 4096 in a3:
        ratio = sum(a3[8192][op] for op in LAYER_OPS) / (2 * sum(a3[4096][op] for op in LAYER_OPS))
        print(f"\nBeyond 4096 tokens the Llama-2-7B files end; the H100 layer time is taken as linear from 4096. "
              f"On A100, Llama-3-8B's layer time at 8192 is {ratio:.3f} x twice that at 4096.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
