"""Every architecture of tests/model_coverage.py, as a user brings it (a local Hugging Face
directory), through the real services: served greedy-identical to transformers' `generate`, or
refused at load with one line that names the model type and the feature.

A served model is checked on both paths a prompt can take, with prompts longer than every window:
- through the gateway: the prefill worker (packed prefill), the KV pushed layer by layer, and
  paged decode in batches of unequal contexts (padded and ragged reads, windowed per layer);
- on the decode worker itself (Decode with the prompt, as the aggregated mode and DOPD's
  ultra-short path send it): chunked prefill of at most 48 tokens a step beside the decodes.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from common.convert import sampling_to_pb
from common.errors import EXIT_MODEL_REFUSED
from common.modeling.loader import load_model
from common.pb import worker_pb2, worker_pb2_grpc
from common.rpc.channels import internal_channel
from common.types import SamplingParams
from services.client import generate
from services.launcher import free_port
from tests.helpers import assert_no_leaks, check_greedy_identity, start_cluster
from tests.model_coverage import ARCHITECTURES, WINDOW, save_tiny_model

SERVED = [a for a in ARCHITECTURES if a.refused is None]
REFUSED = [a for a in ARCHITECTURES if a.refused is not None]
PROMPT_LENGTHS = (170, 131, 97, 20)  # past the 64-token windows, and one inside them
LOCAL_PROMPT_LENGTHS = (170, 75)
MAX_TOKENS = 24
STEP_TOKEN_BUDGET = 48  # the decode worker's chunks: a 170-token prompt takes four steps
EOS = {2}


def prompts_for(lengths, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture
def arch_cluster(request, tmp_path_factory, redis_url, redis_prefix):
    arch = request.param
    directory = save_tiny_model(arch, tmp_path_factory.mktemp(f"model-{arch.name}"))
    handle = start_cluster(str(directory), tmp_path_factory.mktemp(f"cluster-{arch.name}"), redis_url,
                           f"{redis_prefix}coverage-{arch.name}:", kv_blocks=256,
                           worker_env={"decode-0": {"DOPD_STEP_TOKEN_BUDGET": str(STEP_TOKEN_BUDGET)}})
    yield arch, directory, handle
    codes = handle.cluster.stop()
    assert all(code == 0 for code in codes.values()), f"a service did not drain cleanly: {codes}"


async def decode_locally(address: str, prompt: list[int]) -> list[int]:
    """A prompt sent to a decode worker with its tokens: prefilled there in chunks, then decoded."""
    params = SamplingParams(max_tokens=MAX_TOKENS, stop_token_ids=frozenset(EOS))
    stub = worker_pb2_grpc.WorkerStub(internal_channel(address))
    call = stub.Decode(worker_pb2.DecodeRequest(
        request_id=uuid.uuid4().hex, prompt_len=len(prompt), sampling=sampling_to_pb(params),
        prompt_token_ids=prompt), timeout=120)
    tokens: list[int] = []
    async for event in call:
        if event.WhichOneof("event") == "tokens":
            assert event.tokens.start_index == len(tokens)
            tokens.extend(event.tokens.token_ids)
    return tokens


@pytest.mark.parametrize("arch_cluster", SERVED, indirect=True, ids=[a.name for a in SERVED])
async def test_served_greedy_identical(arch_cluster):
    arch, directory, handle = arch_cluster
    reference = load_model(str(directory)).model
    vocab = reference.config.vocab_size
    prompts = prompts_for(PROMPT_LENGTHS, 0, vocab)
    async with handle.channel() as ch:
        outs = await asyncio.gather(*(generate(ch, p, max_tokens=MAX_TOKENS, temperature=0.0) for p in prompts))
    served = [o.token_ids for o in outs]
    local_prompts = prompts_for(LOCAL_PROMPT_LENGTHS, 1, vocab)
    local = await asyncio.gather(*(decode_locally(handle.workers["decode-0"], p) for p in local_prompts))
    assert max(PROMPT_LENGTHS) > 2 * WINDOW
    for name, ps, got in (("prefill worker + KV push + paged decode", prompts, served),
                          ("chunked prefill on the decode worker", local_prompts, local)):
        assert all(got), f"{arch.name}, {name}: an empty completion"
        report = check_greedy_identity(reference, ps, got, [MAX_TOKENS] * len(ps), EOS)
        print(f"{arch.name}, {name}: {report.exact}/{report.requests} identical, {report.tokens_compared} tokens "
              f"compared, near ties {report.near_ties}")
    await assert_no_leaks(handle)


@pytest.mark.parametrize("arch", REFUSED, ids=[a.name for a in REFUSED])
def test_refused_at_load_in_one_line(arch, tmp_path):
    """`dopd up` on a model the paths cannot serve exactly: the refusal's one line, a non-zero exit,
    and no worker restarted in a loop."""
    directory = save_tiny_model(arch, tmp_path / "model")
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("dopd")), "up", "--model", str(directory), "--port", str(free_port()),
         "--http-port", "0", "--log-dir", str(tmp_path / "logs"), "--ready-timeout", "120"],
        capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    line = f"(model_type {arch.name}) is refused: {arch.refused}"
    assert line in out, out
    assert "Traceback" not in out, out
    assert f"={EXIT_MODEL_REFUSED}" in out, out  # the workers' exit status, as `dopd up` prints it
    assert "restart" not in out, out
    worker_log = (tmp_path / "logs" / "prefill-0.log").read_text()
    assert line in worker_log and "Traceback" not in worker_log, worker_log
