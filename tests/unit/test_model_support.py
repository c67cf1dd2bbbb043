"""Which models the workers refuse at load (common/modeling/support.py): the features named from
the config, the probe that compares the paged paths with the model's own forward, and the one
line `dopd up` shows for a refusal."""

from __future__ import annotations

import pytest
import transformers

from common.errors import ModelRefused
from common.modeling.loader import causal_lm_class
from common.modeling.registry import RunnerSpec, build_runner
from common.modeling.support import check_exact, unsupported_feature
from services.launcher import refusal_line
from tests.model_coverage import ARCHITECTURES


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=[a.name for a in ARCHITECTURES])
def test_the_coverage_list_is_named_from_the_config(arch):
    config = arch.config()
    feature = unsupported_feature(config, causal_lm_class(config))
    if arch.name == "gpt_oss":  # its sinks are parameters, seen on the loaded model
        assert feature is None
    else:
        assert feature == arch.refused


@pytest.mark.parametrize("config, feature", [
    (transformers.T5Config(), "encoder-decoder models"),
    (transformers.DeepseekV3Config(num_hidden_layers=2), "multi-head latent attention (compressed KV)"),
    (transformers.FalconConfig(alibi=True), "ALiBi position bias"),
    (transformers.Qwen3NextConfig(num_hidden_layers=4), "linear attention"),
])
def test_features_the_paths_lack(config, feature):
    model_class = causal_lm_class(config) if not config.is_encoder_decoder else transformers.T5ForConditionalGeneration
    assert unsupported_feature(config, model_class) == feature


def test_a_class_outside_the_attention_interface_is_refused():
    class OwnAttention:
        _supports_attention_backend = False

    assert "AttentionInterface" in unsupported_feature(transformers.LlamaConfig(), OwnAttention)


def test_the_probe_passes_a_model_the_paths_serve():
    runner = build_runner(RunnerSpec("tiny-random", kv_blocks=16, block_size=16)).runner
    assert check_exact("tiny-random", runner, "sdpa") < 1e-4


def test_the_probe_refuses_what_no_list_names():
    """Bidirectional attention (no config flag says it): the paged decode cannot see the future
    tokens the model's own forward attends to, so the probe's logits differ and it refuses."""
    runner = build_runner(RunnerSpec("tiny-random", kv_blocks=16, block_size=16)).runner
    for module in runner.model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    with pytest.raises(ModelRefused, match=r"\(model_type llama\) is refused: the paged attention's logits differ"):
        check_exact("tiny-random", runner, "sdpa")


def test_refusal_line_is_found_in_a_worker_log():
    log = ("2026-12-07 21:09:37,939 common.rpc.server INFO stopped\n"
           "2026-12-07 21:09:37,940 common.rpc.server ERROR model '/m' (model_type gpt_oss) is refused: "
           "attention sinks\n")
    assert refusal_line(log) == "model '/m' (model_type gpt_oss) is refused: attention sinks"
    assert "see its log" in refusal_line("nothing here\n")


def test_kv_heads_under_each_configs_name():
    from common.modeling.runner import kv_heads

    assert kv_heads(transformers.LlamaConfig(num_attention_heads=8, num_key_value_heads=2)) == 2
    assert kv_heads(transformers.FalconConfig(new_decoder_architecture=True, num_kv_heads=4)) == 4
    assert kv_heads(transformers.FalconConfig(multi_query=True, new_decoder_architecture=False)) == 1
    assert kv_heads(transformers.GPTNeoXConfig(num_attention_heads=8)) == 8


def test_a_layer_that_drops_the_batch_keyword_is_refused_not_a_traceback():
    import torch

    from common.modeling.paged_attention import UnsupportedAttention, paged_attention

    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(UnsupportedAttention, match="do not pass the forward's keywords on"):
        paged_attention(torch.nn.Module(), q, q, q, None, scaling=1.0)
