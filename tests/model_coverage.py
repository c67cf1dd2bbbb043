"""The architectures a user may bring, as tiny seeded random models: what the coverage test
(`tests/integration/test_model_coverage.py`) serves through the real services, and what the
README's supported-models table is generated from (`scripts/gen_supported_models.py`), so the
table says what the test checks and cannot drift from it.

Each model is small (4 layers of width 64, GQA 4:2) with the SmolLM2 tokenizer's vocabulary, and
its attention features set as the real checkpoints set them, windows shrunk to 64 tokens so that
a 170-token prompt runs past every window. `refused` names the feature the worker refuses the
model for (common/modeling/support.py); None: served, and greedy-identical to transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

WINDOW = 64  # every sliding window, shrunk so that the test's prompts run past it
SEED = 4321

_COMMON = {
    "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048,
    # Wider than the usual 0.02 so that logits are peaked and greedy ties are rare.
    "initializer_range": 0.2, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 2,
}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
_ALTERNATE = ["sliding_attention", "full_attention"] * 2  # Gemma2's and gpt-oss's pattern, 4 layers
_THREE_TO_ONE = ["sliding_attention"] * 3 + ["full_attention"]  # Gemma3's 5:1, Cohere2's 3:1, cut to 4


@dataclass(frozen=True)
class Architecture:
    name: str  # transformers' model_type
    config_class: str  # in transformers
    features: str  # what sets it apart, for the table
    overrides: dict = field(default_factory=dict)
    drop: tuple[str, ...] = ()  # common keys this config does not take
    refused: str | None = None  # the feature named in the refusal; None: served exactly

    def config(self):
        import transformers

        kwargs = {k: v for k, v in _COMMON.items() if k not in self.drop}
        return getattr(transformers, self.config_class)(**{**kwargs, **self.overrides})


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", "LlamaConfig", "GQA, RoPE (SmolLM2, Llama 2/3)"),
    Architecture("mistral", "MistralConfig", f"sliding window on every layer ({WINDOW} here)",
                 {"sliding_window": WINDOW}),
    Architecture("mixtral", "MixtralConfig", "mixture of experts, sliding window",
                 {"sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2}),
    Architecture("qwen2", "Qwen2Config", "QKV bias; sliding window on the upper layers",
                 {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2}),
    Architecture("qwen3", "Qwen3Config", "QK norm"),
    Architecture("qwen3_moe", "Qwen3MoeConfig", "QK norm, mixture of experts", _MOE),
    Architecture("gemma", "GemmaConfig", "scaled embeddings, GeGLU"),
    Architecture("gemma2", "Gemma2Config",
                 "attention logit soft-capping, sliding and global layers alternating, final soft-capping",
                 {"sliding_window": WINDOW, "layer_types": _ALTERNATE, "attn_logit_softcapping": 50.0,
                  "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16}),
    Architecture("gemma3_text", "Gemma3TextConfig",
                 "interleaved sliding and global layers (local RoPE base on the sliding ones), QK norm",
                 {"sliding_window": WINDOW, "layer_types": _THREE_TO_ONE, "query_pre_attn_scalar": 16}),
    Architecture("cohere2", "Cohere2Config", "interleaved sliding and global layers, parallel block, logit scale",
                 {"sliding_window": WINDOW, "layer_types": _THREE_TO_ONE}, drop=("head_dim",)),
    Architecture("phi3", "Phi3Config", "fused QKV, sliding window", {"sliding_window": WINDOW},
                 drop=("head_dim",)),
    Architecture("olmo2", "Olmo2Config", "QK norm, post-norm", drop=("head_dim",)),
    Architecture("starcoder2", "Starcoder2Config", "sliding window, biases, LayerNorm",
                 {"sliding_window": WINDOW}, drop=("head_dim",)),
    Architecture("smollm3", "SmolLM3Config", "layers without RoPE (NoPE)", {"no_rope_layer_interval": 2},
                 drop=("head_dim",)),
    Architecture("granite", "GraniteConfig", "embedding, attention and residual multipliers",
                 {"embedding_multiplier": 2.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5,
                  "logits_scaling": 4.0}, drop=("head_dim",)),
    Architecture("phi", "PhiConfig", "partial rotary, parallel attention and MLP",
                 {"partial_rotary_factor": 0.5}, drop=("head_dim",)),
    Architecture("olmo3", "Olmo3Config", "interleaved sliding and global layers, QK norm",
                 {"sliding_window": WINDOW, "layer_types": _THREE_TO_ONE}, drop=("head_dim",)),
    Architecture("exaone4", "Exaone4Config", "interleaved sliding and global layers",
                 {"sliding_window": WINDOW, "layer_types": _THREE_TO_ONE}),
    Architecture("glm4", "Glm4Config", "partial rotary, extra post norms"),
    Architecture("gpt_neox", "GPTNeoXConfig", "no GQA (KV heads named by attention heads), parallel residual, "
                 "partial rotary (Pythia)", {"rotary_pct": 0.5}, drop=("head_dim", "num_key_value_heads")),
    Architecture("falcon", "FalconConfig", "its own attention code, outside the AttentionInterface",
                 {"new_decoder_architecture": True, "num_kv_heads": 2},
                 drop=("head_dim", "num_key_value_heads", "intermediate_size"),
                 refused="attention that does not go through transformers' AttentionInterface"),
    Architecture("bloom", "BloomConfig", "ALiBi position bias", {"n_layer": 4, "n_head": 4},
                 drop=("head_dim", "num_key_value_heads", "num_hidden_layers", "num_attention_heads",
                       "intermediate_size"), refused="ALiBi position bias"),
    Architecture("gpt_oss", "GptOssConfig", "attention sinks, sliding and global layers",
                 {"sliding_window": WINDOW, "layer_types": _ALTERNATE, "num_local_experts": 4,
                  "num_experts_per_tok": 2}, refused="attention sinks"),
    Architecture("llama4_text", "Llama4TextConfig", "chunked attention layers",
                 {"attention_chunk_size": WINDOW, "num_local_experts": 2, "intermediate_size_mlp": 128},
                 refused="chunked attention"),
)


def save_tiny_model(arch: Architecture, directory: Path, tokenizer_source: Path | None = None) -> Path:
    """A seeded random model of `arch` as a local Hugging Face directory (config, safetensors
    weights, generation config and the SmolLM2 tokenizer), what `dopd up --model DIR` takes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.modeling.loader import smollm2_dir

    directory.mkdir(parents=True, exist_ok=True)
    config = arch.config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_source or smollm2_dir()).save_pretrained(directory)
    return directory


ARCH_BY_NAME: dict[str, Architecture] = {a.name: a for a in ARCHITECTURES}
TABLE_BEGIN = "<!-- supported-models: generated by scripts/gen_supported_models.py from tests/model_coverage.py -->"
TABLE_END = "<!-- /supported-models -->"


def table_rows(tested: Callable[[Architecture], str], result: Callable[[Architecture], str]) -> list[str]:
    rows = ["| architecture (`model_type`) | what it exercises | tested how | result |", "| --- | --- | --- | --- |"]
    rows += [f"| `{a.name}` | {a.features} | {tested(a)} | {result(a)} |" for a in ARCHITECTURES]
    return rows
