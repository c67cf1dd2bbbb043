"""Runner registry: the worker asks for a runner by engine name and never imports an engine.

    hf    real Hugging Face models (smollm2, tiny-random, a local directory)   common/modeling/runner.py
    sim   no weights; forward passes take a latency profile's time ("sim:PROFILE") common/modeling/sim_runner.py
    fake  no weights, no sleeping; deterministic tokens that depend on the KV bytes ("fake:")  fake_runner.py

A model name "ENGINE:REST" selects ENGINE when it is registered; any other name is an hf model.
Built-in engines register themselves when their module is imported, which happens on first use,
so importing the registry pulls in no model code (and no import cycle). Tests register their own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from common.modeling.base import Runner


@dataclass(frozen=True)
class RunnerSpec:
    model: str
    device: str = "auto"
    dtype: str = "float32"
    kv_blocks: int = 2048
    block_size: int = 0  # 0 = auto: the runner picks it for its device and kernel (choose_block_size)
    time_scale: float = 1.0  # sim only
    # What DOPD_KV_TRANSPORT lets peers do with the pool (services/kvtransfer/transports): map it,
    # a CPU pool on this host (common/kv/shared_memory.py); read it with NIXL, which is installed
    # (the sim engine then keeps scratch bytes for them to read, common/modeling/sim_runner.py).
    shared_kv: bool = False
    nixl_kv: bool = False

    @property
    def engine(self) -> str:
        return engine_of(self.model)

    @property
    def model_arg(self) -> str:
        """The model name without its engine prefix."""
        return self.model.removeprefix(self.engine + ":")


@dataclass
class BuiltRunner:
    runner: Runner
    vocab_size: int
    attention: str  # what runs attention, for logs and status


RunnerFactory = Callable[[RunnerSpec], BuiltRunner]
_FACTORIES: dict[str, RunnerFactory] = {}
_BUILTIN_MODULES = {"hf": "common.modeling.runner", "sim": "common.modeling.sim_runner",
                    "fake": "common.modeling.fake_runner"}


def register_runner(name: str) -> Callable[[RunnerFactory], RunnerFactory]:
    def deco(factory: RunnerFactory) -> RunnerFactory:
        _FACTORIES[name] = factory
        return factory
    return deco


def engine_of(model: str) -> str:
    prefix, sep, _ = model.partition(":")
    return prefix if sep and (prefix in _FACTORIES or prefix in _BUILTIN_MODULES) else "hf"


def build_runner(spec: RunnerSpec) -> BuiltRunner:
    name = spec.engine
    if name not in _FACTORIES and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"no runner {name!r}; registered: {sorted(set(_FACTORIES) | set(_BUILTIN_MODULES))}") from None
    return factory(spec)
