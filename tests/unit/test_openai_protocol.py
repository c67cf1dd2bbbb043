"""The OpenAI API's pure shapes: request bodies to checked parameters, domain errors to HTTP."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.errors import DeadlineExceeded, InvalidArgument, Refused, ResourceExhausted, ServiceError, Unavailable
from services.gateway.openai_protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseShaper,
    from_domain,
    from_validation,
)


def test_completion_params_defaults_and_aliases():
    body = CompletionRequest(model="m", prompt="hi", stop="END", top_k=-1, seed=7, user="u-1")
    p = body.params_for(default_max_tokens=64)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (64, 1.0, 1.0, 0, 7, ("END",))
    assert body.single_prompt() == "hi"
    assert CompletionRequest(model="m", prompt=["only"]).single_prompt() == "only"
    assert CompletionRequest(model="m", prompt=[[1, 2]]).single_prompt() == [1, 2]
    with pytest.raises(ApiError, match="batch of 2"):
        CompletionRequest(model="m", prompt=["a", "b"]).single_prompt()


def test_chat_max_completion_tokens_wins_and_text_parts():
    body = ChatCompletionRequest(model="m", max_tokens=5, max_completion_tokens=9, temperature=0,
                                 messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]}])
    assert body.params_for(64).max_tokens == 9
    assert body.template_messages() == [{"role": "user", "content": "ab"}]
    image = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(ApiError, match="only text content parts"):
        image.template_messages()


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 3}, "n"), ({"logprobs": 2}, "logprobs"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"echo": True}, "echo"), ({"best_of": 2}, "best_of"),
])
def test_unsupported_fields_are_refused_by_name(body, param):
    with pytest.raises(ApiError) as info:
        CompletionRequest(model="m", prompt="x", **body).params_for(16)
    assert info.value.status == 400 and info.value.param == param


def test_checks_shared_with_grpc():
    with pytest.raises(InvalidArgument, match=r"top_p must be in \(0, 1\], got 1.5"):
        CompletionRequest(model="m", prompt="x", top_p=1.5).params_for(16)


def test_validation_error_names_the_parameter():
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_tokens": "lots"})
    err = from_validation(info.value)
    assert err.status == 400 and err.param == "max_tokens" and "max_tokens" in err.message


@pytest.mark.parametrize(("exc", "status"), [
    (InvalidArgument("x"), 400), (ResourceExhausted("x"), 429), (Unavailable("x"), 503), (Refused("x"), 503),
    (DeadlineExceeded("x"), 504), (ServiceError("x"), 500),
])
def test_domain_errors_map_to_http(exc, status):
    err = from_domain(exc)
    assert err.status == status and err.message == "x"


def test_shaper_objects():
    chat = ResponseShaper("chat", "m")
    first, last = chat.chunk("He", first=True), chat.chunk("", "stop")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "He"}
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert first["id"] == last["id"] and first["object"] == "chat.completion.chunk" and "usage" not in first
    usage = ResponseShaper.usage(3, 4)
    assert chat.usage_chunk(usage)["choices"] == [] and usage["total_tokens"] == 7
    full = ResponseShaper("completion", "m").full("text", "length", usage)
    assert full["object"] == "text_completion" and full["choices"][0]["text"] == "text" and full["usage"] == usage
