"""The KV block size: 0 (the default) is auto, 256 where decode runs flash-attn (its paged kernel
reads blocks in place and takes multiples of 256 only), 16 elsewhere; an explicit size is kept,
and one flash-attn cannot page makes decode fall back to SDPA with a warning. Workers report the
size they resolved, which is what the gateway and the planner read."""

from __future__ import annotations

import logging

import pytest

from common.config import WorkerSettings
from common.kv.block_pool import DEFAULT_BLOCK_SIZE, FLASH_PAGE_MULTIPLE, choose_block_size, flash_pages
from common.kv.kv_store import PagedKVStore
from common.modeling.loader import load_model
from common.modeling.registry import RunnerSpec, build_runner
from common.modeling.runner import ModelRunner, kv_layout
from services.simulate.sim import SimConfig
from services.worker.runtime import WorkerRuntime


@pytest.mark.parametrize("requested, flash, expected", [
    (0, False, DEFAULT_BLOCK_SIZE), (0, True, FLASH_PAGE_MULTIPLE),
    (32, False, 32), (32, True, 32), (512, True, 512), (256, False, 256)])
def test_choose_block_size(requested, flash, expected):
    assert choose_block_size(requested, flash) == expected


def test_negative_block_size_is_refused():
    with pytest.raises(ValueError, match="0 for auto"):
        choose_block_size(-16, False)
    with pytest.raises(ValueError):
        WorkerSettings(block_size=-1)


def test_flash_pages():
    assert flash_pages(256) and flash_pages(512)
    assert not flash_pages(16) and not flash_pages(128) and not flash_pages(384)


def test_settings_default_is_auto(monkeypatch):
    monkeypatch.delenv("DOPD_BLOCK_SIZE", raising=False)
    assert WorkerSettings().block_size == 0
    monkeypatch.setenv("DOPD_BLOCK_SIZE", "64")
    assert WorkerSettings().block_size == 64
    # The simulator keeps 16 (a worker's 0 means auto).
    assert SimConfig.block_size == DEFAULT_BLOCK_SIZE


@pytest.mark.parametrize("model", ["tiny-random", "fake:", "sim:smollm2-cpu2"])
def test_runners_resolve_auto_on_cpu(model):
    runner = build_runner(RunnerSpec(model, device="cpu", kv_blocks=4)).runner
    assert runner.store.block_size == DEFAULT_BLOCK_SIZE
    assert build_runner(RunnerSpec(model, device="cpu", kv_blocks=4, block_size=8)).runner.store.block_size == 8


def test_flash_decode_needs_pages_of_256(caplog):
    # The rule on any machine: a model on flash-attn (as the loader marks it on CUDA) reads blocks
    # in place only when they are a multiple of 256; otherwise decode gathers and runs SDPA, and
    # the worker says so. Nothing runs here, so no GPU is needed.
    loaded = load_model("tiny-random", "cpu")
    loaded.attention = "flash_attention_2"
    layout = kv_layout(loaded)
    with caplog.at_level(logging.WARNING, logger="common.modeling.runner"):
        small = ModelRunner(loaded, PagedKVStore(layout, 2, 16, loaded.device))
    assert small.use_flash and not small.use_flash_decode
    assert "multiples of 256" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="common.modeling.runner"):
        paged = ModelRunner(loaded, PagedKVStore(layout, 2, 256, loaded.device))
    assert paged.use_flash_decode and not caplog.text
    sdpa = load_model("tiny-random", "cpu")
    assert not ModelRunner(sdpa, PagedKVStore(kv_layout(sdpa), 2, 256, sdpa.device)).use_flash_decode


def test_worker_reports_the_block_size_it_resolved(monkeypatch):
    monkeypatch.delenv("DOPD_BLOCK_SIZE", raising=False)
    runtime = WorkerRuntime(WorkerSettings(model="fake:", kv_blocks=8, worker_id="w"))
    try:
        assert runtime.info().block_size == 0  # not loaded yet: no pool
        runtime._load()
        assert runtime.pool.block_size == DEFAULT_BLOCK_SIZE == runtime.info().block_size
        assert runtime.decode.runner.store.block_size == DEFAULT_BLOCK_SIZE
    finally:
        runtime.executor.shutdown(wait=True)
        runtime.kv_executor.shutdown(wait=True)
