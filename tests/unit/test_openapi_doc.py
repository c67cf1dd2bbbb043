"""The OpenAPI document of the gateway's HTTP API (services/gateway/openapi_doc.py): a document
schemathesis loads, narrowed to what the server serves, and whose request schemas agree with the
pydantic models that parse the bodies."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from services.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.openapi_doc import openapi_document

DOC = openapi_document("test", "1", "served-model")
SCHEMA = schemathesis.openapi.from_dict(DOC)


def test_the_document_names_every_route_and_the_one_model_served():
    assert set(DOC["paths"]) == {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        properties = DOC["components"]["schemas"][name]["properties"]
        assert properties["model"]["enum"] == ["served-model"]
        assert properties["n"] == {"const": 1, "title": "N"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert {"200", "400", "429", "503", "504"} <= set(DOC["paths"][path]["post"]["responses"])


@pytest.mark.parametrize(("path", "model_cls"), [("/v1/completions", CompletionRequest),
                                                 ("/v1/chat/completions", ChatCompletionRequest)])
def test_every_body_the_document_allows_parses(path, model_cls):
    """Drawn from the document's own schema: the pydantic model takes it (what the server then
    refuses, it refuses with a 400 and a message, tests/integration/test_fuzz_gateway.py)."""

    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=SCHEMA[path]["POST"].as_strategy())
    def parses(case):
        assert model_cls.model_validate(case.body).model == "served-model"

    parses()
