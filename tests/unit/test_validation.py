import math

import pytest

from common.errors import InvalidArgument
from common.pb import gateway_pb2 as gw
from services.gateway.validation import (
    MAX_STOP_STRINGS,
    GenerateParams,
    validate_context,
    validate_params,
    validate_prompt_ids,
)


def test_defaults_when_unset():
    assert validate_params(gw.GenerateRequest(prompt="hi"), default_max_tokens=64) == GenerateParams(
        max_tokens=64, temperature=1.0, top_p=1.0, top_k=0, seed=None, stop=(), ignore_eos=False)


def test_set_fields_are_taken():
    req = gw.GenerateRequest(prompt="hi", max_tokens=5, temperature=0.0, top_p=0.5, top_k=3, seed=0,
                             stop=["\n", "END"], ignore_eos=True)
    assert validate_params(req, 64) == GenerateParams(5, 0.0, 0.5, 3, 0, ("\n", "END"), True)


@pytest.mark.parametrize("fields, field_name", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": -math.inf}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": [str(i) for i in range(MAX_STOP_STRINGS + 1)]}, "stop"),
])
def test_rejections_name_the_field(fields, field_name):
    with pytest.raises(InvalidArgument, match=field_name):
        validate_params(gw.GenerateRequest(prompt="hi", **fields), 64)


def test_default_max_tokens_is_checked_too():
    with pytest.raises(InvalidArgument, match="max_tokens"):
        validate_params(gw.GenerateRequest(prompt="hi"), default_max_tokens=0)


def test_limits_that_are_accepted():
    req = gw.GenerateRequest(prompt="hi", max_tokens=1, temperature=0.0, top_p=1.0, top_k=0,
                             stop=[str(i) for i in range(MAX_STOP_STRINGS)])
    assert len(validate_params(req, 64).stop) == MAX_STOP_STRINGS


def test_prompt_ids():
    validate_prompt_ids([0, 5, 99], vocab_size=100)
    with pytest.raises(InvalidArgument, match="prompt"):
        validate_prompt_ids([], 100)
    for bad in (100, -1, 10**6):
        with pytest.raises(InvalidArgument, match=rf"prompt token id {bad}\b"):
            validate_prompt_ids([1, bad, 2], 100)


def test_context():
    validate_context(prompt_len=100, max_tokens=28, max_context=128)
    with pytest.raises(InvalidArgument, match="max_tokens") as info:
        validate_context(prompt_len=100, max_tokens=29, max_context=128)
    assert "prompt" in str(info.value) and "129" in str(info.value) and "128" in str(info.value)
