"""Fuzzing (hypothesis) of the gateway's two public front ends on a real tiny-random cluster
(1 prefill + 1 decode worker): malformed and extreme requests get a clear answer, nothing
crashes, nothing leaks.

- gRPC Generate: random field values (negative, zero and huge max_tokens; NaN, infinite, negative
  and huge temperature and top_p; huge top_k and seeds; token ids out of the vocabulary and
  negative; empty prompts; many and empty stop strings; chat on and off). The answer is a finished
  stream, or INVALID_ARGUMENT / RESOURCE_EXHAUSTED with a message (never INTERNAL or UNKNOWN); and
  INVALID_ARGUMENT exactly when a field is invalid (an oracle from the documented checks).
- HTTP POST /v1/completions and /v1/chat/completions: valid bodies with fields dropped, retyped,
  pushed to extremes or buried in nested garbage, extra fields, and bodies that are not JSON
  objects at all (random bytes, truncated JSON, scalars). The answer is 200 (a completion, or a
  stream that ends with [DONE] and no error chunk) or a 4xx whose body is an OpenAI error object
  {"error": {"message", "type", "param", "code"}}; never a 5xx.
- Afterwards the cluster serves a normal request on both APIs and holds no KV block
  (tests.helpers.assert_no_leaks), and every service exits cleanly.

The requests that broke these properties when this file was written (HTTP 500s: a seed past
uint64, a top_k past int32, a lone surrogate in a text prompt, a 5000-digit number, JSON nested
100,000 deep; gRPC UNKNOWN for bytes that do not parse) are fixed; each keeps a test below with its
reproduction.
"""

from __future__ import annotations

import contextlib
import json
import math

import grpc
import httpx
import hypothesis.errors
import pytest
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from common.pb import gateway_pb2, gateway_pb2_grpc
from services.client import generate
from services.gateway.validation import MAX_STOP_STRINGS
from tests.helpers import assert_no_leaks, start_cluster

MODEL = "tiny-random"
VOCAB = 49152  # common/modeling/loader.tiny_random_config
CONTEXT = 2048
DEFAULT_MAX_TOKENS = 64  # common/config.GatewaySettings
TIMEOUT_S = 60.0
FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

INT32 = st.integers(-(2**31), 2**31 - 1)
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)  # protobuf strings are UTF-8
# JSON strings may hold lone surrogates ("\ud800"): the tokenizer refuses them (400).
HTTP_TEXT = st.one_of(st.text(max_size=24), st.text(max_size=24), st.text(max_size=24),
                      st.builds(str.__add__, st.text(max_size=8), st.characters(categories=["Cs"])))
SAMPLE_PROMPTS = st.sampled_from(["Hello", "The capital of France is", "", " ", "\n\n", "<|im_end|>"])
PROMPTS = SAMPLE_PROMPTS | TEXT
HTTP_PROMPTS = SAMPLE_PROMPTS | HTTP_TEXT
FLOATS = (st.floats(width=32) | st.floats() |
          st.sampled_from([0.0, -0.0, 1e-45, 1e-6, 0.5, 1.0, 1.0000001, 2.0, -1.0, 3.4e38, 1e39]))


@pytest.fixture(scope="module")
def fuzz_cluster(redis_url, redis_prefix, tmp_path_factory):
    handle = start_cluster(MODEL, tmp_path_factory.mktemp("fuzz-cluster"), redis_url, redis_prefix + "fuzz:")
    yield handle
    codes = handle.cluster.stop()
    assert all(code == 0 for code in codes.values()), f"a service did not exit cleanly after the fuzzing: {codes}"


@pytest.fixture(scope="module")
def stub(fuzz_cluster):
    with grpc.insecure_channel(fuzz_cluster.gateway) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


@pytest.fixture(scope="module")
def http(fuzz_cluster):
    with httpx.Client(base_url=fuzz_cluster.cluster.http_url, timeout=TIMEOUT_S) as client:
        yield client


# -- gRPC --------------------------------------------------------------------------------------

GRPC_FIELDS = ("prompt", "max_tokens", "temperature", "top_p", "top_k", "stop")


@st.composite
def generate_requests(draw) -> gateway_pb2.GenerateRequest:
    """Every field extreme but valid, except (about half the time) one or two drawn from their
    invalid values. Which it is the test decides from the message itself (grpc_invalid)."""
    bad = draw(st.sets(st.sampled_from(GRPC_FIELDS), min_size=draw(st.sampled_from([0, 0, 1, 2])), max_size=2),
               label="invalid fields")
    req = gateway_pb2.GenerateRequest()
    if draw(st.booleans()):
        req.request_id = draw(TEXT)
    req.chat = draw(st.booleans())
    req.ignore_eos = draw(st.booleans())
    if draw(st.booleans()):
        req.seed = draw(st.integers(0, 2**64 - 1) | st.sampled_from([0, 2**63, 2**64 - 1]))
    valid_ids = st.lists(st.integers(0, VOCAB - 1) | st.sampled_from([0, 1, 2, VOCAB - 1]), min_size=1, max_size=12)
    if "prompt" not in bad:
        if draw(st.booleans()):
            req.prompt = draw(PROMPTS.filter(bool))
        else:
            req.prompt_token_ids.ids.extend(draw(valid_ids))
    else:
        how = draw(st.sampled_from(["empty text", "empty ids", "none", "out of vocabulary"]))
        if how == "empty text":
            req.prompt = ""
        elif how == "empty ids":
            req.prompt_token_ids.SetInParent()
        elif how == "out of vocabulary":
            ids = draw(valid_ids)
            bad_id = draw(st.sampled_from([-1, -(2**31), VOCAB, VOCAB + 1, 2**31 - 1]))
            ids.insert(draw(st.integers(0, len(ids))), bad_id)
            req.prompt_token_ids.ids.extend(ids)
    if "max_tokens" in bad:
        req.max_tokens = draw(st.integers(-(2**31), 0) | st.integers(CONTEXT, 2**31 - 1) | st.just(CONTEXT))
    elif draw(st.integers(0, 5)):
        req.max_tokens = draw(st.integers(1, 3))  # else unset: the default (64)
    if "temperature" in bad:
        req.temperature = draw(st.sampled_from([math.nan, math.inf, -math.inf, -1e-45, -1.0, 1e39]) |
                               st.floats(max_value=-1e-45))
    elif draw(st.booleans()):
        req.temperature = draw(st.sampled_from([0.0, -0.0, 1e-45, 1e-5, 0.5, 1.0, 2.0, 3.4e38]) |
                               st.floats(0.0, 3.3999999521443642e38, width=32))
    if "top_p" in bad:
        req.top_p = draw(st.sampled_from([0.0, -0.0, -1.0, 1.0000001, 2.0, math.nan, math.inf]) |
                         st.floats(min_value=1.0, exclude_min=True) | st.floats(max_value=0.0))
    elif draw(st.booleans()):
        req.top_p = draw(st.sampled_from([1e-45, 1e-6, 0.5, 1.0]) | st.floats(1.401298464324817e-45, 1.0, width=32))
    if "top_k" in bad:
        req.top_k = draw(st.integers(-(2**31), -1))
    elif draw(st.booleans()):
        req.top_k = draw(st.integers(0, 50) | st.integers(0, 2**31 - 1) | st.just(2**31 - 1))
    if "stop" in bad:
        stops = draw(st.lists(st.sampled_from([".", "\n", "the"]) | TEXT.filter(bool), max_size=20))
        if draw(st.booleans()) or len(stops) <= MAX_STOP_STRINGS:
            stops.insert(draw(st.integers(0, len(stops))), "")
        req.stop.extend(stops)
    else:
        req.stop.extend(draw(st.lists(st.sampled_from([".", "\n", "the", " "]) | TEXT.filter(bool),
                                      max_size=MAX_STOP_STRINGS)))
    return req


def grpc_invalid(req: gateway_pb2.GenerateRequest) -> str | None:
    """Why the gateway must refuse this request with INVALID_ARGUMENT (None: it is valid), from
    the documented checks (services/gateway/validation.py, common/prompts.py)."""
    ids = list(req.prompt_token_ids.ids) if req.WhichOneof("input") == "prompt_token_ids" else None
    if ids is None and not req.prompt or ids == []:
        return "prompt is empty"
    if ids is not None and any(not 0 <= t < VOCAB for t in ids):
        return "token id outside the vocabulary"
    max_tokens = req.max_tokens if req.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens < 1:
        return "max_tokens < 1"
    if req.HasField("temperature") and not (math.isfinite(req.temperature) and req.temperature >= 0):
        return "temperature"
    if req.HasField("top_p") and not 0 < req.top_p <= 1:
        return "top_p"
    if req.HasField("top_k") and req.top_k < 0:
        return "top_k"
    if len(req.stop) > MAX_STOP_STRINGS or any(not s for s in req.stop):
        return "stop strings"
    prompt_len = len(ids) if ids is not None else 1  # a non-empty text is at least one token
    if prompt_len + max_tokens > CONTEXT:
        return "context"
    return None


@FUZZ
@given(req=generate_requests())
def test_grpc_generate_finishes_or_refuses_clearly(stub, req):
    invalid = grpc_invalid(req)
    try:
        replies = list(stub.Generate(req, timeout=TIMEOUT_S))
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        event(f"grpc: {code.name}")
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), \
            f"{code.name}: {details!r} for {req}"
        assert details, f"{code.name} without a message for {req}"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert invalid, f"a valid request was refused: {details!r} for {req}"
        else:
            assert invalid in (None, "context"), f"refused for want of resources, not for its {invalid}"
        return
    event("grpc: OK")
    assert invalid is None, f"a request with an invalid {invalid} was served: {req}"
    assert replies, "an empty stream"
    last = replies[-1]
    assert last.finish_reason != 0 and all(r.finish_reason == 0 for r in replies[:-1])
    max_tokens = req.max_tokens if req.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    assert 1 <= last.usage.completion_tokens <= max_tokens and last.usage.prompt_tokens >= 1
    assert all(0 <= t < VOCAB for r in replies for t in r.token_ids)


# -- HTTP ----------------------------------------------------------------------------------------

# Integers are small, or past the context: a valid max_tokens of hundreds would make the run slow.
INTS = st.integers(-(10**20), -3) | st.integers(-3, 3) | st.integers(CONTEXT, 10**20)
JSON_LEAF = (st.none() | st.booleans() | INTS | st.floats() | HTTP_TEXT |
             st.sampled_from([0, 1, -1, 2**31, 2**63, 1e308, "1", "true", "null"]))
JSON = st.recursive(JSON_LEAF,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(HTTP_TEXT, inner, max_size=4),
                    max_leaves=10)
NUMBERS = (st.integers(-(10**30), 0) | st.integers(1, 3) | st.integers(CONTEXT, 10**30) |
           st.sampled_from([1.0, 2.5, -1.0, 1e10, 1e400, float("nan"), 2**31 - 1, 2**31, 2**63]) |
           st.sampled_from(["2", "x", "", True, None, [], {}]))
SMALL = st.integers(1, 3)


def field(typed: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a value of the right kind, sometimes any JSON at all."""
    return typed | typed | typed | JSON


CONTENT_PARTS = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "image_url"]) | HTTP_TEXT},
                                               optional={"text": field(HTTP_TEXT), "image_url": JSON}), max_size=3)
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "user", "system", "assistant", "tool"]) | HTTP_TEXT},
                          optional={"content": field(HTTP_PROMPTS | st.none() | CONTENT_PARTS), "name": JSON}),
    max_size=4)
TOKEN_IDS = st.lists(st.integers(0, VOCAB - 1) | st.sampled_from([-1, VOCAB, 10**12]), max_size=10)

COMMON_FIELDS = {
    # seed and top_k reach past uint64 and int32 (the workers' protobuf fields): refused with 400.
    "temperature": field(FLOATS), "top_p": field(FLOATS),
    "top_k": field(st.integers(-3, 2**31 - 1) | st.sampled_from([2**31, 2**32, 2**63]) | st.integers(2**31 - 2, 2**64)),
    "seed": field(st.integers(0, 2**64 - 1) | st.sampled_from([-1, -(2**63), 2**64, 2**70]) |
                  st.integers(-(2**65), 2**65)),
    "n": field(st.integers(-1, 3)),
    "stop": field(st.none() | HTTP_PROMPTS | st.lists(st.sampled_from(["", ".", "\n"]) | HTTP_TEXT, max_size=20)),
    "stream": field(st.booleans()), "stream_options": field(st.fixed_dictionaries({}, optional={
        "include_usage": field(st.booleans())})),
    "ignore_eos": field(st.booleans()), "user": field(HTTP_TEXT), "logprobs": field(st.none() | st.booleans() | SMALL),
    "presence_penalty": field(FLOATS), "frequency_penalty": field(FLOATS), "unknown_field": JSON,
}
COMPLETION_FIELDS = {
    "prompt": field(HTTP_PROMPTS | TOKEN_IDS | st.lists(HTTP_PROMPTS, max_size=2) | st.lists(TOKEN_IDS, max_size=2)),
    "max_tokens": field(NUMBERS), "echo": field(st.booleans()), "suffix": field(st.none() | HTTP_TEXT),
    "best_of": field(st.none() | st.integers(0, 3)),
}
CHAT_FIELDS = {
    "messages": field(MESSAGES), "max_tokens": field(NUMBERS), "max_completion_tokens": field(NUMBERS),
    "tools": field(st.none() | st.lists(JSON, max_size=2)),
    "response_format": field(st.none() | st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})),
}


@st.composite
def openai_bodies(draw, chat: bool) -> dict:
    """A valid body, then some fields replaced by drawn values (of their kind, or any JSON) and
    some dropped."""
    body: dict = {"model": MODEL, "max_tokens": draw(SMALL), "temperature": 0.0}
    if chat:
        body["messages"] = [{"role": "user", "content": draw(HTTP_PROMPTS.filter(bool))}]
    else:
        body["prompt"] = draw(HTTP_PROMPTS.filter(bool))
    fields = {**COMMON_FIELDS, **(CHAT_FIELDS if chat else COMPLETION_FIELDS)}
    # Mostly one field changed, so that an extreme value often gets past the others' checks.
    count = draw(st.sampled_from([1, 1, 1, 2, 4]), label="fields changed")
    for name in draw(st.lists(st.sampled_from(sorted(fields)), min_size=count, max_size=count, unique=True)):
        body[name] = draw(fields[name], label=name)
    if draw(st.integers(0, 7)) == 0:
        body["model"] = draw(field(st.sampled_from([MODEL, "gpt-4", ""]) | HTTP_TEXT), label="model")
    if draw(st.integers(0, 4)) == 0:
        for name in draw(st.lists(st.sampled_from(sorted(body)), min_size=1, max_size=2, unique=True), label="dropped"):
            del body[name]
    return body


def _event(text: str) -> None:
    """hypothesis' statistics, outside a hypothesis test too (the regression tests)."""
    with contextlib.suppress(hypothesis.errors.InvalidArgument):
        event(text)


def check_http_answer(response: httpx.Response, what) -> None:
    status = response.status_code
    assert status < 500, f"{status} for {what!r}: {response.text[:300]}"
    if status == 200:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            lines = [ln for ln in response.text.splitlines() if ln]
            assert lines and lines[-1] == "data: [DONE]", f"a stream that does not end with [DONE]: {lines[-3:]}"
            for line in lines[:-1]:
                assert line.startswith("data: "), line
                chunk = json.loads(line[6:])
                assert "error" not in chunk, f"an error inside a 200 stream for {what!r}: {chunk}"
            _event("http: 200 stream")
        else:
            doc = response.json()
            assert len(doc["choices"]) == 1 and doc["usage"]["completion_tokens"] >= 1, doc
            _event("http: 200")
        return
    assert 400 <= status < 500
    doc = response.json()
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}, doc
    error = doc["error"]
    assert isinstance(error["message"], str) and error["message"], doc
    assert isinstance(error["type"], str) and error["type"], doc
    assert error["param"] is None or isinstance(error["param"], str), doc
    assert error["code"] is None or isinstance(error["code"], str), doc
    _event(f"http: {status}")


@FUZZ
@given(chat=st.booleans(), data=st.data())
def test_http_json_bodies_get_200_or_an_openai_error(http, chat, data):
    body = data.draw(openai_bodies(chat), label="body")
    path = "/chat/completions" if chat else "/completions"
    # NaN and Infinity as Python's json writes them: the server's parser takes them.
    response = http.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    check_http_answer(response, body)


TRUNCATED = st.builds(lambda body, cut: json.dumps(body)[:cut],
                      st.fixed_dictionaries({"model": st.just(MODEL), "prompt": HTTP_PROMPTS, "max_tokens": SMALL}),
                      st.integers(0, 60))
RAW_BODIES = (st.binary(max_size=200) | TRUNCATED.map(str.encode) |
              JSON.map(lambda doc: json.dumps(doc).encode()) |
              st.sampled_from([b"", b"null", b"[]", b"{}", b"0", b'"x"', b"{", b"\xff\xfe\x00", b"{'model': 1}",
                               b'{"model": "tiny-random", "prompt": "hi", "max_tokens": 2,}']))


@settings(FUZZ, max_examples=40)
@given(chat=st.booleans(), content=RAW_BODIES)
def test_http_non_object_bodies_get_an_openai_error(http, chat, content):
    try:
        doc = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        doc = None
    response = http.post("/chat/completions" if chat else "/completions", content=content,
                         headers={"Content-Type": "application/json"})
    check_http_answer(response, content)
    if not isinstance(doc, dict):
        assert response.status_code == 400, f"{response.status_code} for a body that is no JSON object: {content!r}"


# -- what broke the properties once (each fixed; kept as a regression test) ---------------------------

def _json_with(extra: str) -> bytes:
    return ('{"model": "tiny-random", "prompt": "Hello", "max_tokens": 2' + extra + "}").encode()


KNOWN_HTTP_500 = [
    pytest.param("/completions", _json_with(', "seed": -1'), id="seed-negative"),
    pytest.param("/completions", _json_with(f', "seed": {2**64}'), id="seed-past-uint64"),
    pytest.param("/completions", _json_with(f', "top_k": {2**31}'), id="top_k-past-int32"),
    pytest.param("/completions", b'{"model": "tiny-random", "prompt": "\\ud800", "max_tokens": 2}',
                 id="lone-surrogate-in-prompt"),
    pytest.param("/completions", _json_with(', "n": ' + "1" * 5000), id="int-of-5000-digits"),
    pytest.param("/completions", b"[" * 100_000 + b"]" * 100_000, id="json-nested-100000-deep"),
]


@pytest.mark.parametrize(("path", "content"), KNOWN_HTTP_500)
def test_bodies_that_were_a_500_get_a_4xx(fuzz_cluster, path, content):
    response = httpx.post(fuzz_cluster.cluster.http_url + path, content=content,
                          headers={"Content-Type": "application/json"}, timeout=TIMEOUT_S)
    check_http_answer(response, content[:80])


@pytest.mark.parametrize("blob", [b"\x12\x02\xff\xfe", b"\xff\xff\xff"], ids=["prompt-not-utf8", "corrupt"])
def test_undecodable_grpc_request_is_invalid_argument(fuzz_cluster, blob):
    with grpc.insecure_channel(fuzz_cluster.gateway) as channel:
        call = channel.unary_stream("/dopd.v1.Gateway/Generate")  # raw bytes both ways
        with pytest.raises(grpc.RpcError) as info:
            list(call(blob, timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details())


# -- the OpenAI API against its own OpenAPI document (schemathesis) -------------------------------

@pytest.fixture(scope="module")
def openai_schema(fuzz_cluster):
    """GET /openapi.json of the running gateway (services/gateway/openapi_doc.py)."""
    return schemathesis.openapi.from_url(fuzz_cluster.cluster.http_url.removesuffix("/v1") + "/openapi.json")


# What the schema can promise: no 5xx; status codes, content types and bodies as documented; a body
# that breaks the schema refused with a 4xx. Not "a body the schema allows is served": the server
# also checks what no schema says (max_tokens against the prompt and the context, token ids against
# the vocabulary, values of OpenAI fields it does not implement) and answers those with a 400.
SCHEMA_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
                 negative_data_rejection]
# (path, method, generation mode): positive cases are requests the schema allows, negative ones
# break it (GET /v1/models takes no input to break).
CASES = [(path, "POST", mode) for path in ("/v1/completions", "/v1/chat/completions")
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
CASES.append(("/v1/models", "GET", GenerationMode.POSITIVE))


# schemathesis's own pytest integration does not run under pytest 9: its cases are drawn here as a
# hypothesis strategy.
@pytest.mark.parametrize(("path", "method", "mode"), CASES, ids=[f"{m} {p} {g.value}" for p, m, g in CASES])
def test_openai_api_keeps_to_its_openapi_document(openai_schema, fuzz_cluster, path, method, mode):
    operation = openai_schema[path][method]
    base_url = fuzz_cluster.cluster.http_url.removesuffix("/v1")

    @settings(max_examples=60 if method == "POST" else 5, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def conforms(case):
        response = case.call(base_url=base_url, timeout=TIMEOUT_S)
        event(f"{response.status_code}")
        case.validate_response(response, checks=SCHEMA_CHECKS)

    conforms()


# -- afterwards ----------------------------------------------------------------------------------

async def test_still_serves_and_nothing_leaked(fuzz_cluster):
    """Runs last (file order): the cluster serves a normal request on both APIs and, once they
    are done, holds no KV block and no request on any worker."""
    async with fuzz_cluster.channel() as channel:
        out = await generate(channel, "The capital of France is", max_tokens=4, temperature=0.0, timeout=TIMEOUT_S)
    assert out.completion_tokens >= 1 and out.finish_reason in ("stop", "length")
    async with httpx.AsyncClient(base_url=fuzz_cluster.cluster.http_url, timeout=TIMEOUT_S) as client:
        response = await client.post("/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
    await assert_no_leaks(fuzz_cluster, timeout=20)
