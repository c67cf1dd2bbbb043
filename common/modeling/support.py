"""Which Hugging Face decoders the paged paths serve exactly, and the refusal of the others.

A model is served only if its tokens are the ones transformers' own forward gives. Two checks
stand between a model directory and a serving worker, both at load:

1. `unsupported_feature` (pure: the config and the model class's flags) names what the paths
   do not implement: attention that bypasses transformers' AttentionInterface, layer kinds
   other than full and sliding-window attention (chunked, linear, state-space), ALiBi, latent
   (MLA) or shared KV, attention sinks, encoder-decoder models.
2. `check_exact` runs a short prompt through every paged path (packed prefill with its per-layer
   KV written into the pool, a decode step, a prefill in chunks) and compares its logits with the
   model's own forward. It catches what no list foresees: a keyword the paged attention drops, a
   mask the model builds for itself. It sees only the first `PROBE_TOKENS` positions, so windows
   longer than that are checked by tests/integration/test_model_coverage.py, not here.

Either refusal raises `ModelRefused`, whose one line names the model type and the feature; the
worker exits with EXIT_MODEL_REFUSED and `dopd up` reports it instead of restarting the worker.
The architectures tried, and what happens to each, are in the README's supported-models table.
"""

from __future__ import annotations

import random

import torch

from common.errors import ModelRefused

ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
LAYER_TYPE_FEATURES = {"chunked_attention": "chunked attention", "linear_attention": "linear attention",
                       "mamba": "state-space (Mamba) layers", "conv": "convolution layers"}
ALIBI_MODEL_TYPES = frozenset({"bloom", "mpt", "baichuan"})  # ALiBi always (Falcon: when config.alibi)
PROBE_TOKENS = 40
# Largest difference allowed between the paged paths' logits and the model's own, relative to the
# largest logit: kernels differ in summation order (fp32 ~1e-6 here), a missing feature by far more.
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 5e-2}


def unsupported_feature(config, model_class) -> str | None:
    """What of this model the paged paths do not implement, in a few words; None if nothing."""
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models"
    other = sorted(set(getattr(config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES)
    if other:
        return LAYER_TYPE_FEATURES.get(other[0], f"{other[0]} layers")
    if getattr(config, "attention_chunk_size", None):
        return "chunked attention"
    alibi = config.model_type in ALIBI_MODEL_TYPES or getattr(config, "alibi", False)
    if alibi or getattr(config, "position_embedding_type", "") == "alibi":
        return "ALiBi position bias"
    if getattr(config, "kv_lora_rank", None):
        return "multi-head latent attention (compressed KV)"
    if getattr(config, "num_kv_shared_layers", 0):
        return "KV shared across layers"
    if not getattr(model_class, "_supports_attention_backend", False):
        return "attention that does not go through transformers' AttentionInterface"
    return None


def has_attention_sinks(model: torch.nn.Module) -> bool:
    """gpt-oss's learned per-head sink logits (a `sinks` parameter in its attention layers)."""
    return any(name.rsplit(".", 1)[-1] == "sinks" for name, _ in model.named_parameters())


def refuse_unsupported(name: str, config, model: torch.nn.Module) -> None:
    """The first check, on a loaded model: raises ModelRefused naming the feature."""
    feature = unsupported_feature(config, type(model))
    if feature is None and has_attention_sinks(model):
        feature = "attention sinks"
    if feature is not None:
        raise ModelRefused(name, config.model_type, feature)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest difference of two logit vectors, relative to the reference's largest logit."""
    return float((ours - reference).abs().max() / reference.abs().max().clamp_min(1e-6))


@torch.inference_mode()
def check_exact(name: str, runner, native_attention: str) -> float:
    """The second check: the runner's paged paths against the model's own forward (under
    `native_attention`) on a seeded prompt of PROBE_TOKENS tokens. Returns the largest relative
    error; raises ModelRefused past PROBE_TOLERANCE. Uses blocks of the pool before any request
    holds one (they are lent later and overwritten then)."""
    from common.modeling.base import PromptChunk
    from common.modeling.paged_attention import UnsupportedAttention

    model, store = runner.model, runner.store
    config = model.config
    vocab = config.vocab_size
    rng = random.Random(0)
    prompt = [rng.randrange(3, vocab) for _ in range(PROBE_TOKENS)]
    paged = config._attn_implementation
    model.set_attn_implementation(native_attention)
    try:
        ids = torch.tensor([prompt], device=runner.device)
        reference = model(input_ids=ids, use_cache=False).logits[0].float()
    finally:
        model.set_attn_implementation(paged)
    blocks_needed = -(-PROBE_TOKENS // store.block_size)
    if 2 * blocks_needed > store.num_blocks:
        return 0.0  # a pool too small to probe; the static check stands alone
    packed = list(range(blocks_needed))
    chunked = list(range(blocks_needed, 2 * blocks_needed))
    head = PROBE_TOKENS - 2

    def keep(layer, k, v):  # the first prompt's KV, packed ahead of a second one
        store.write_tokens(layer, store.slots(packed, 0, head), k[:, :head].transpose(0, 1),
                           v[:, :head].transpose(0, 1))

    try:
        prefill = runner.prefill([prompt[:head], prompt[:7]], keep)[0]
        decode = runner.decode([prompt[head]], [head], [packed])[0]
        half = PROBE_TOKENS // 2
        runner.prefill_chunk(PromptChunk(prompt[:half], 0, chunked, None))
        chunk = runner.prefill_chunk(PromptChunk(prompt[half:], half, chunked, None))
    except UnsupportedAttention as exc:
        raise ModelRefused(name, config.model_type, exc.feature) from None
    except Exception as exc:  # a shape the paths do not expect, say: refused in one line, not a traceback
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelRefused(name, config.model_type,
                           f"the paged paths fail on a probe ({type(exc).__name__}: {reason[:160]})") from exc
    error = max(relative_error(prefill, reference[head - 1]), relative_error(decode, reference[head]),
                relative_error(chunk, reference[-1]))
    if error > PROBE_TOLERANCE.get(store.layout.dtype, 5e-2):
        raise ModelRefused(name, config.model_type,
                           f"the paged attention's logits differ from the model's own by {error:.1e} (relative) "
                           "on a probe: an attention feature of this architecture is not implemented")
    return error
