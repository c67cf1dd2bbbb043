"""The OpenAPI document of the gateway's HTTP API (GET /openapi.json), pure: request bodies from
the pydantic models that parse them (openai_protocol.py), responses as openai_api.py writes them.
Clients and API tools read it; tests/integration/test_fuzz_gateway.py has schemathesis fuzz the
running gateway against it.

The pydantic models parse every value OpenAI's API allows, so that a value this server does not
implement gets a message saying so (n > 1, logprobs, penalties, tools...: openai_protocol.py);
the document narrows each field to what is served (`SERVED`). What no schema can say the server
still checks, with a 400 and a message: a field against another (max_tokens against the prompt's
length and the context) and against the model (token ids inside the vocabulary).
"""

from __future__ import annotations

from services.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.validation import INT32_MAX, MAX_STOP_STRINGS, UINT64_MAX

REF = "#/components/schemas/{model}"

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
USAGE = {
    "type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {name: {"type": "integer", "minimum": 0}
                   for name in ("prompt_tokens", "completion_tokens", "total_tokens")},
}
FINISH = {"type": ["string", "null"], "enum": ["stop", "length", None]}
# One server-sent event of a stream: `data` is a chunk's JSON (an error object on a failure after the
# stream began), or "[DONE]" last.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}


def _completion(object_name: str, choice: dict) -> dict:
    return {
        "type": "object", "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"}, "object": {"const": object_name}, "created": {"type": "integer"},
            "model": {"type": "string"}, "usage": {"$ref": REF.format(model="Usage")},
            "choices": {"type": "array", "items": {
                "type": "object", "required": ["index", "finish_reason", *choice],
                "properties": {"index": {"type": "integer"}, "finish_reason": FINISH, **choice}}},
        },
    }


COMPLETION = _completion("text_completion", {"text": {"type": "string"}})
CHAT_COMPLETION = _completion("chat.completion", {"message": {
    "type": "object", "required": ["role", "content"],
    "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}}})
MODELS = {
    "type": "object", "required": ["object", "data"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
        "type": "object", "required": ["id", "object"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"}}}}},
}

# Every error a request may get, as openai_api.py maps them (openai_protocol.HTTP_OF_ERROR).
ERRORS = {
    "400": "invalid input: a field's type or value, a prompt too long, an unknown parameter value",
    "401": "a missing or wrong API key (where the gateway has API keys)",
    "404": "a model this gateway does not serve",
    "429": "overload: a full queue, or admission control's predicted TTFT past the SLO",
    "503": "no worker can take it now, or the gateway is starting or draining",
    "504": "past the request's deadline",
}


def _error_responses(codes) -> dict:
    return {code: {"description": ERRORS[code],
                   "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}}
            for code in codes}


def _generation(summary: str, body: str, result: str) -> dict:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": {"$ref": REF.format(model=body)}}}},
        "responses": {
            "200": {"description": "the completion; with stream: server-sent events of chunks, then [DONE]",
                    "content": {"application/json": {"schema": {"$ref": REF.format(model=result)}},
                                "text/event-stream": {"schema": SSE_EVENT}}},
            **_error_responses(ERRORS),
        },
    }}


def _or_null(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


STOP_STRING = {"type": "string", "minLength": 1}
# The values served, field by field (services/gateway/validation.check_params, openai_protocol.py).
SERVED = {
    "max_tokens": _or_null({"type": "integer", "minimum": 1}),
    "max_completion_tokens": _or_null({"type": "integer", "minimum": 1}),
    "temperature": _or_null({"type": "number", "minimum": 0, "maximum": 3.4e38}),
    "top_p": _or_null({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
    "top_k": _or_null({"type": "integer", "minimum": -1, "maximum": INT32_MAX}),
    "seed": _or_null({"type": "integer", "minimum": 0, "maximum": UINT64_MAX}),
    "stop": _or_null({"anyOf": [STOP_STRING, {"type": "array", "items": STOP_STRING, "maxItems": MAX_STOP_STRINGS}]}),
    "n": {"const": 1},
    "logprobs": {"enum": [None, False, 0]},
    "presence_penalty": {"const": 0},
    "frequency_penalty": {"const": 0},
    "echo": {"const": False},
    "suffix": _or_null({"type": "string", "maxLength": 0}),
    "best_of": {"enum": [None, 1]},
    "tools": _or_null({"type": "array", "maxItems": 0}),
    "response_format": _or_null({"type": "object", "properties": {"type": {"const": "text"}}}),
}


def _request_schema(model_cls, served_model: str) -> tuple[dict, dict]:
    """(the request body's schema narrowed to what is served, the schemas it refers to)."""
    schema = model_cls.model_json_schema(ref_template=REF)
    defs = schema.pop("$defs", {})
    properties = schema["properties"]
    properties["model"] = {"type": "string", "enum": [served_model]}
    for name, narrowed in SERVED.items():
        if name in properties:
            properties[name] = {**narrowed, "title": properties[name].get("title", name)}
    return schema, defs


def openapi_document(title: str, version: str, model: str) -> dict:
    """The document of a gateway that serves `model`."""
    schemas = {"Error": ERROR, "Usage": USAGE, "Completion": COMPLETION, "ChatCompletion": CHAT_COMPLETION,
               "ModelList": MODELS}
    for request_cls in (CompletionRequest, ChatCompletionRequest):
        schema, defs = _request_schema(request_cls, model)
        schemas.update(defs)
        schemas[request_cls.__name__] = schema
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": {
            "/v1/completions": _generation("a text completion of one prompt (text or token ids)",
                                           "CompletionRequest", "Completion"),
            "/v1/chat/completions": _generation("a chat completion of one conversation", "ChatCompletionRequest",
                                                "ChatCompletion"),
            "/v1/models": {"get": {"summary": "the model this gateway serves", "responses": {
                "200": {"description": "one model",
                        "content": {"application/json": {"schema": {"$ref": REF.format(model="ModelList")}}}},
                **_error_responses(["401"])}}},
        },
        "components": {"schemas": schemas},
    }
