"""Bad input gets INVALID_ARGUMENT (or RESOURCE_EXHAUSTED) with a message naming the problem,
and every service keeps serving with no KV block held."""

from __future__ import annotations

import grpc
import pytest

from services.client import generate
from tests.helpers import assert_no_leaks

CASES = [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": []}, "prompt is empty"),
    ({"prompt": [1, 2, 10**6]}, "outside the vocabulary"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 5000}, "beyond the model's context"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stop": [""]}, "stop strings"),
]


@pytest.mark.parametrize(("override", "message"), CASES, ids=[m for _, m in CASES])
async def test_invalid_argument(tiny_cluster, override, message):
    kw = {"prompt": "Hello", "max_tokens": 4, **override}
    prompt = kw.pop("prompt")
    async with tiny_cluster.channel() as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(ch, prompt, timeout=10, **kw)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()
        ok = await generate(ch, "Hello", max_tokens=2, temperature=0.0)  # still serving
        assert ok.completion_tokens == 2
    await assert_no_leaks(tiny_cluster)


async def test_oversize_message_is_resource_exhausted(tiny_cluster):
    async with tiny_cluster.channel() as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(ch, "x" * (5 * 1024 * 1024), max_tokens=2, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await generate(ch, "Hello", max_tokens=2)).completion_tokens == 2
    await assert_no_leaks(tiny_cluster)
