"""The CUDA path (skipped without a GPU): paged decode on the GPU pool gives transformers'
generate() output, with the default block size (256 where flash-attn runs decode, reading the
blocks in place through flash_attn_with_kvcache; 16 with SDPA) and with explicit ones; and a
prefill worker's KV pushed over the real PushKV path (pinned buffers, side streams) lands in the
decode worker's GPU pool byte for byte, after which decode goes on as generate() does.

The CPU counterparts: tests/unit/test_chunked_prefill.py, tests/integration/test_serving_tiny.py
and tests/integration/test_worker_kv.py; the pure parts: tests/unit/test_block_size.py and
tests/unit/test_device_copy.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import uuid

import grpc
import pytest
import torch

from common.config import WorkerSettings
from common.convert import sampling_to_pb
from common.kv.block_pool import DEFAULT_BLOCK_SIZE, FLASH_PAGE_MULTIPLE
from common.modeling.base import PromptChunk
from common.modeling.loader import flash_attn_importable, load_model
from common.modeling.registry import RunnerSpec, build_runner
from common.modeling.support import PROBE_TOLERANCE, relative_error
from common.pb import worker_pb2, worker_pb2_grpc
from common.rpc.channels import internal_channel
from common.types import SamplingParams
from services.launcher import free_port
from services.worker.runtime import WorkerRuntime
from services.worker.server import WorkerServicer
from tests.helpers import check_greedy_identity

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEVICE = "cuda"
EOS = 2
FLASH = torch.cuda.is_available() and flash_attn_importable()
# fp32: the same arithmetic as generate() up to summation order; fp16: a near-tie may flip.
NEAR_TIE = {"float32": 1e-4, "float16": 5e-2}


def random_prompts(seed: int, lengths: list[int], vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def paged_greedy(runner, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy completions through the runner alone: one packed prefill whose KV is written into
    each prompt's blocks (scattered, last block first), then batched paged decode steps."""
    store = runner.store
    need = [-(-(len(p) + max_tokens) // store.block_size) for p in prompts]
    assert sum(need) <= store.num_blocks
    free = list(range(sum(need)))[::-1]
    tables = [[free.pop() for _ in range(n)][::-1] for n in need]
    bounds = list(itertools.accumulate((len(p) for p in prompts), initial=0))

    def keep(layer, k, v):  # as a decode worker's pool receives it
        for table, a, b in zip(tables, bounds[:-1], bounds[1:], strict=True):
            store.write_tokens(layer, store.slots(table, 0, b - a).to(k.device), k[:, a:b].transpose(0, 1),
                               v[:, a:b].transpose(0, 1))

    outs = [[t] for t in runner.prefill(prompts, keep).argmax(-1).tolist()]
    while live := [i for i, o in enumerate(outs) if len(o) < max_tokens and o[-1] != EOS]:
        logits = runner.decode([outs[i][-1] for i in live], [len(prompts[i]) + len(outs[i]) - 1 for i in live],
                               [tables[i] for i in live])
        for i, token in zip(live, logits.argmax(-1).tolist(), strict=True):
            outs[i].append(token)
    return outs


# (dtype, DOPD_BLOCK_SIZE, expected block size, decode reads blocks in place with flash-attn)
CASES = [
    ("float16", 0, FLASH_PAGE_MULTIPLE if FLASH else DEFAULT_BLOCK_SIZE, FLASH),  # the default
    ("float16", 16, 16, False),  # flash-attn's prefill, decode falls back to SDPA on gathered blocks
    ("float16", 512, 512, FLASH),
    ("float32", 0, DEFAULT_BLOCK_SIZE, False),  # flash-attn takes fp16/bf16 only: SDPA
    ("float32", 256, 256, False),
]


@pytest.mark.parametrize("dtype, requested, block_size, in_place", CASES)
def test_paged_decode_identity_on_cuda(dtype, requested, block_size, in_place):
    runner = build_runner(RunnerSpec("tiny-random", device=DEVICE, dtype=dtype, kv_blocks=64,
                                     block_size=requested)).runner
    assert runner.store.block_size == block_size and runner.store.kv.device.type == DEVICE
    assert runner.use_flash_decode == in_place
    reference = load_model("tiny-random", DEVICE, getattr(torch, dtype)).model
    # Block edges: 255 decodes into a second block at its second token, 300 starts in one.
    prompts = random_prompts(0, [5, 37, 255, 300], reference.config.vocab_size)
    max_tokens = 24
    outs = paged_greedy(runner, prompts, max_tokens)
    report = check_greedy_identity(reference, prompts, outs, [max_tokens] * len(prompts), {EOS},
                                   near_tie=NEAR_TIE[dtype])
    assert report.tokens_compared >= len(prompts)
    print(f"{dtype} block {block_size} ({'flash_attn_with_kvcache' if in_place else 'sdpa'}): "
          f"{report.exact}/{report.requests} identical, near ties {report.near_ties}")


WINDOWED = ("mistral", "gemma2", "gemma3_text", "cohere2")  # sliding windows, per layer; gemma2 soft-caps too


@pytest.mark.parametrize("requested", [0, 16], ids=["flash-decode", "sdpa-decode"])
@pytest.mark.parametrize("arch_name", WINDOWED)
def test_windows_and_softcap_on_cuda(arch_name, requested, tmp_path):
    """flash-attn's kernels take the layer's window (`window_size`) and soft-cap (`softcap`); with
    16-token blocks decode gathers and runs SDPA (soft-capped layers: the eager arithmetic). Prompts
    run past the 64-token windows; the reference is generate() on the model's own kernels."""
    from tests.model_coverage import ARCH_BY_NAME, save_tiny_model

    directory = str(save_tiny_model(ARCH_BY_NAME[arch_name], tmp_path / arch_name))
    runner = build_runner(RunnerSpec(directory, device=DEVICE, dtype="float16", kv_blocks=64,
                                     block_size=requested)).runner
    reference = load_model(directory, DEVICE, torch.float16).model
    prompts = random_prompts(1, [20, 150, 300], reference.config.vocab_size)
    max_tokens = 24
    outs = paged_greedy(runner, prompts, max_tokens)
    report = check_greedy_identity(reference, prompts, outs, [max_tokens] * len(prompts), {EOS},
                                   near_tie=NEAR_TIE["float16"])
    assert report.tokens_compared >= len(prompts)
    # The same 300-token prompt in chunks of 100 over the GPU pool (window-masked SDPA): its last
    # logits are the model's own, to fp16's tolerance.
    table = list(range(40, 40 + -(-300 // runner.store.block_size)))
    for start in range(0, 300, 100):
        logits = runner.prefill_chunk(PromptChunk(prompts[2][start:start + 100], start, table, None))
    with torch.inference_mode():
        own = reference(torch.tensor([prompts[2]], device=DEVICE)).logits[0, -1].float()
    assert relative_error(logits, own) < PROBE_TOLERANCE[torch.float16]
    print(f"{arch_name} block {runner.store.block_size} (flash decode {runner.use_flash_decode}): "
          f"{report.exact}/{report.requests} identical, near ties {report.near_ties}")


@pytest.mark.skipif(not FLASH, reason="needs flash-attn")
def test_flash_decode_is_the_default_on_cuda(monkeypatch):
    monkeypatch.delenv("DOPD_BLOCK_SIZE", raising=False)
    settings = WorkerSettings(model="tiny-random", device=DEVICE, dtype="bfloat16")
    built = build_runner(RunnerSpec(settings.model, device=settings.device, dtype=settings.dtype, kv_blocks=4,
                                    block_size=settings.block_size))
    assert built.runner.store.block_size == FLASH_PAGE_MULTIPLE and built.runner.use_flash_decode
    assert "flash_attn_with_kvcache" in built.attention


@contextlib.asynccontextmanager
async def gpu_worker(role: str, dtype: str, **settings):
    """A worker runtime on the GPU (the model loaded once, both engines running) behind a real
    gRPC server, in this process."""
    port = free_port()
    runtime = WorkerRuntime(WorkerSettings(model="tiny-random", device=DEVICE, dtype=dtype, role=role,
                                           worker_id=f"{role}-gpu", worker_port=port, kv_blocks=64,
                                           kv_transport="grpc", **settings))
    await asyncio.get_running_loop().run_in_executor(runtime.executor, runtime._load)
    runtime.prefill.start()
    runtime.decode.start()
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(runtime), server)
    server.add_insecure_port(runtime.address)
    await server.start()
    try:
        yield runtime
    finally:
        await server.stop(None)
        await runtime.close()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
async def test_kv_push_lands_equal_on_cuda(dtype):
    # Small chunks, so that both of the wire's paths carry KV: layers coalesced (the short prompt)
    # and one layer split by tokens (the long one). tiny-random: 128 bytes per token and layer in fp16.
    chunks = {"kv_chunk_min_bytes": 8192, "kv_chunk_max_bytes": 16384}
    async with gpu_worker("decode", dtype, **chunks) as decode, gpu_worker("prefill", dtype, **chunks) as prefill:
        pool = decode.decode.runner.store
        assert pool.kv.device.type == prefill.prefill.runner.store.kv.device.type == DEVICE
        sent: dict[str, dict[int, torch.Tensor]] = {}
        open_sender = prefill.prefill.open_sender

        def recording(address, request_id, num_tokens, timeout):  # what the real sender was handed
            sender = open_sender(address, request_id, num_tokens, timeout)
            put_layer = sender.put_layer

            def put(layer, k, v):
                sent.setdefault(request_id, {})[layer] = torch.stack([k.transpose(0, 1), v.transpose(0, 1)]).cpu()
                put_layer(layer, k, v)
            sender.put_layer = put
            return sender

        prefill.prefill.open_sender = recording
        reference = load_model("tiny-random", DEVICE, getattr(torch, dtype)).model
        prompts = random_prompts(1, [20, 300], reference.config.vocab_size)
        max_tokens = 12
        params = SamplingParams(max_tokens=max_tokens, stop_token_ids=frozenset({EOS}))
        outs = []
        async with internal_channel(decode.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            for prompt in prompts:
                request_id = uuid.uuid4().hex
                call = stub.Decode(worker_pb2.DecodeRequest(request_id=request_id, prompt_len=len(prompt),
                                                            sampling=sampling_to_pb(params)), timeout=60)
                assert (await call.read()).WhichOneof("event") == "reserved"
                table = list(decode.decode.scheduler.seqs[request_id].block_table)
                result = await prefill.prefill.prefill(request_id, prompt, params, decode.address, timeout=60)
                assert result.kv_bytes == pool.layout.bytes_for(len(prompt))
                tokens = {0: result.first_token_id}
                while (event := await call.read()) is not grpc.aio.EOF:
                    if event.WhichOneof("event") == "tokens":
                        tokens.update(zip(itertools.count(event.tokens.start_index), event.tokens.token_ids))
                outs.append([tokens[i] for i in range(len(tokens))])
                # The prompt's positions are never written again: read them back now, before a
                # later request may be lent the same blocks.
                landed = pool.read_chunk(0, pool.layout.num_layers, pool.slots(table, 0, len(prompt))).cpu()
                expected = torch.stack([sent[request_id][layer] for layer in range(pool.layout.num_layers)])
                assert torch.equal(landed, expected), f"KV of a {len(prompt)}-token prompt landed changed"
        report = check_greedy_identity(reference, prompts, outs, [max_tokens] * len(prompts), {EOS},
                                       near_tie=NEAR_TIE[dtype])
        assert report.tokens_compared >= len(prompts)
        for _ in range(100):  # release is asynchronous
            if decode.decode.scheduler.pool.num_used == 0:
                break
            await asyncio.sleep(0.05)
        assert decode.decode.scheduler.pool.num_used == 0 and not decode.decode.scheduler.seqs
