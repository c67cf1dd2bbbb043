"""The OpenAI-compatible HTTP API on a real cluster (tiny-random, 1 prefill + 1 decode, an API key),
driven by the official `openai` client (sync, async, streaming) and by raw HTTP for what the
client hides (bad JSON, a disconnect mid-stream). Greedy output must equal the gRPC API's. The
gRPC API takes the same key: without it Generate is refused UNAUTHENTICATED and changes nothing."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import openai
import pytest

from services.client import generate
from tests.helpers import assert_no_leaks, start_cluster

KEY = "test-key-123"
MODEL = "tiny-random"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def api_cluster(redis_url, tmp_path_factory):
    handle = start_cluster(MODEL, tmp_path_factory.mktemp("openai-cluster"), redis_url, "dopd-test-openai:",
                           env={"DOPD_API_KEY": KEY})
    yield handle
    handle.cluster.stop()


@pytest.fixture
def base_url(api_cluster) -> str:
    return api_cluster.cluster.http_url


def sync_client(base_url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)


async def grpc_text(handle, prompt, **kw) -> tuple[str, str, int, int]:
    async with handle.channel() as ch:
        out = await generate(ch, prompt, temperature=0.0, api_key=KEY, **kw)
    return out.text, out.finish_reason, out.prompt_tokens, out.completion_tokens


async def test_completion_equals_grpc(api_cluster, base_url):
    text, finish, prompt_tokens, completion_tokens = await grpc_text(api_cluster, PROMPT, max_tokens=12)
    reply = await asyncio.to_thread(
        sync_client(base_url).completions.create, model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0.0)
    assert reply.object == "text_completion" and reply.model == MODEL
    assert reply.choices[0].text == text
    assert reply.choices[0].finish_reason == finish
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert reply.usage.total_tokens == prompt_tokens + completion_tokens

    # Token ids in, the same text out; and the stop string cuts it.
    ids = await asyncio.to_thread(lambda: sync_client(base_url).completions.create(
        model=MODEL, prompt=[1, 2, 3, 4], max_tokens=6, temperature=0.0))
    assert ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens >= 1


async def test_chat_stream_async_with_usage(api_cluster, base_url):
    text, finish, prompt_tokens, completion_tokens = await grpc_text(api_cluster, PROMPT, max_tokens=10, chat=True)
    client = openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=60)
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_completion_tokens=10, temperature=0.0,
        stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finish]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == completion_tokens
    assert chunks[-1].usage.prompt_tokens == prompt_tokens
    assert len({c.id for c in chunks}) == 1

    whole = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=10, temperature=0.0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == text
    assert whole.usage.completion_tokens == completion_tokens
    await client.close()


async def test_completion_stream_sync(base_url):
    def run():
        return list(sync_client(base_url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                                             temperature=0.0, stream=True))

    chunks = await asyncio.to_thread(run)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].text for c in chunks)
    whole = await asyncio.to_thread(lambda: sync_client(base_url).completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.0))
    assert streamed == whole.choices[0].text


async def test_models_health_and_metrics(api_cluster, base_url):
    models = await asyncio.to_thread(lambda: sync_client(base_url).models.list())
    assert [m.id for m in models.data] == [MODEL]
    async with httpx.AsyncClient() as http:
        health = await http.get(base_url.removesuffix("/v1") + "/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        metrics = await http.get(f"http://{api_cluster.cluster.proc('gateway').metrics_address}/metrics")
    assert 'dopd_http_requests_total{code="200",endpoint="/v1/models"}' in metrics.text


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"temperature": -1.0}, openai.BadRequestError, "temperature must be a finite number >= 0, got -1.0"),
    ({"top_p": 0.0}, openai.BadRequestError, "top_p must be in (0, 1], got 0.0"),
    ({"max_tokens": 0}, openai.BadRequestError, "max_tokens must be at least 1, got 0"),
    ({"max_tokens": 10**6}, openai.BadRequestError, "beyond the model's context"),
    ({"n": 2}, openai.BadRequestError, "n must be 1"),
    ({"stop": [""]}, openai.BadRequestError, "stop strings must not be empty"),
    ({"model": "gpt-4"}, openai.NotFoundError, "model 'gpt-4' is not served here"),
])
async def test_bad_input_is_400_with_the_grpc_message(base_url, kwargs, error, message):
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(error) as info:
        await asyncio.to_thread(lambda: sync_client(base_url).completions.create(**args))
    assert message in info.value.body["message"], info.value.body
    assert set(info.value.body) == {"message", "type", "param", "code"}


async def test_grpc_gives_the_same_message(api_cluster):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await grpc_text(api_cluster, PROMPT, max_tokens=4, top_p=0.0)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "top_p must be in (0, 1], got 0.0"


async def test_the_grpc_api_needs_the_same_key(api_cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from common.pb import gateway_pb2, gateway_pb2_grpc
    from services.client import generate_request, worker_stats

    def served() -> float:
        text = httpx.get(f"http://{gateway_metrics(api_cluster)}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("dopd_requests_total{"))

    before = served()
    async with api_cluster.channel() as ch:
        for metadata in ((), (("authorization", "Bearer wrong-key"),), (("authorization", KEY),)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in gateway_pb2_grpc.GatewayStub(ch).Generate(
                        generate_request(PROMPT, max_tokens=4), metadata=metadata, timeout=30):
                    pass
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "API key" in info.value.details()
        # Refused before any handler ran: nothing was counted, nothing reserved.
        assert served() == before
        used = [(await worker_stats(a)).kv_blocks_used for a in api_cluster.workers.values()]
        assert used == [0] * len(used)
        # Health, reflection's neighbours and GetStatus stay open; with the key, Generate serves.
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        status = await gateway_pb2_grpc.GatewayStub(ch).GetStatus(gateway_pb2.GetStatusRequest(), timeout=10)
        assert status.model
        out = await generate(ch, PROMPT, max_tokens=4, temperature=0.0, api_key=KEY)
        assert out.completion_tokens >= 1 and served() == before + 1


def gateway_metrics(handle) -> str:
    return next(p for p in handle.cluster.procs if p.name == "gateway").metrics_address


async def test_api_key_and_raw_errors(base_url):
    with pytest.raises(openai.AuthenticationError) as info:
        await asyncio.to_thread(lambda: sync_client(base_url, key="wrong").models.list())
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        no_key = await http.post("/completions", json={"model": MODEL, "prompt": "x"})
        assert no_key.status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        bad_json = await http.post("/completions", content=b"{not json", headers=auth)
        assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
        wrong_type = await http.post("/completions", json={"model": MODEL, "prompt": "x", "max_tokens": "many"},
                                     headers=auth)
        assert wrong_type.status_code == 400
        assert wrong_type.json()["error"]["param"] == "max_tokens"
        no_messages = await http.post("/chat/completions", json={"model": MODEL, "messages": []}, headers=auth)
        assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"
        empty = await http.post("/completions", json={"model": MODEL, "prompt": ""}, headers=auth)
        assert empty.status_code == 400


async def cancelled_requests(handle) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://{handle.cluster.proc('gateway').metrics_address}/metrics")).text
    line = next((ln for ln in text.splitlines() if ln.startswith('dopd_requests_total{status="cancelled"}')), None)
    return float(line.split()[-1]) if line else 0.0


async def test_disconnect_mid_stream_frees_every_block(api_cluster, base_url):
    cancelled = await cancelled_requests(api_cluster)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=base_url, timeout=60,
                                 headers={"Authorization": f"Bearer {KEY}"}) as http:
        for _ in range(3):
            async with http.stream("POST", "/completions", json=body) as response:
                assert response.status_code == 200
                seen = 0
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        assert "error" not in json.loads(line[6:])
                        seen += 1
                        if seen == 5:
                            break  # leave with the request mid-stream: the connection closes
    await assert_no_leaks(api_cluster, timeout=20)
    # Each ended as cancelled (the client went away), not by running to its 1500 tokens.
    assert await cancelled_requests(api_cluster) == cancelled + 3
    # The gateway serves on.
    text, *_ = await grpc_text(api_cluster, PROMPT, max_tokens=4)
    assert text
