"""GET /openapi.json: the schema of every route, with the bodies our handlers parse themselves."""

from __future__ import annotations

import httpx
import pytest
from starlette.routing import Route

from roofline.server import create_app
from roofline.server.protocol import CompletionRequest

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture(scope="module")
def schema(server) -> dict:
    """The live server's /openapi.json, fetched without an API key (it needs none, like /health)."""
    with httpx.Client(base_url=server.base_url) as c:
        resp = c.get("/openapi.json")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    return resp.json()


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_is_openapi_3_and_every_ref_resolves(schema):
    assert schema["openapi"].startswith("3.") and schema["info"]["title"] == "roofline"
    components = schema["components"]["schemas"]
    refs = _refs(schema)
    assert refs and all(r.startswith("#/components/schemas/") for r in refs)
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(components)
    operation_ids = [op["operationId"] for ops in schema["paths"].values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))


def test_lists_every_route_the_app_serves(server, schema):
    app = create_app(server.ctx.engine, server.ctx.config)  # the same routes as the live app
    served = {(r.path_format, m.lower()) for r in app.routes if isinstance(r, Route) and r.include_in_schema
              for m in r.methods if m != "HEAD"}
    listed = {(path, method) for path, ops in schema["paths"].items() for method in ops if method in HTTP_METHODS}
    assert listed == served
    assert {path for path, _ in listed} == {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models",
                                            "/v1/models/{model}", "/tokenize", "/detokenize", "/health", "/metrics"}
    hidden = {r.path for r in app.routes if isinstance(r, Route) and not r.include_in_schema}
    assert hidden == {"/openapi.json", "/", "/dashboard", "/dashboard/stats", "/static/{name}"}  # browser pages


def test_post_bodies_are_the_models_the_handlers_parse(schema):
    components = schema["components"]["schemas"]
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/v1/embeddings", "EmbeddingRequest")):
        body = schema["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
    completion = components["CompletionRequest"]
    assert completion["required"] == ["prompt"]
    props = completion["properties"]
    assert set(CompletionRequest.model_fields) == set(props)
    assert {"type": "integer", "minimum": 0} in props["max_tokens"]["anyOf"] and props["max_tokens"]["default"] == 16
    assert {"type": "string"} in props["prompt"]["anyOf"]
    assert {"type": "array", "items": {"type": "integer"}} in props["prompt"]["anyOf"]
    assert {"type": "number", "minimum": 0.0, "maximum": 2.0} in props["temperature"]["anyOf"]
    assert props["stream"] == {"type": "boolean", "default": False, "title": "Stream"}
    chat = components["ChatCompletionRequest"]
    assert chat["required"] == ["messages"] and chat["properties"]["messages"]["minItems"] == 1


def test_responses_and_auth(server, schema):
    paths = schema["paths"]
    ok = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletionResponse"}
    assert "text/event-stream" in ok
    assert paths["/v1/models/{model}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ModelCard"}
    for path, ops in paths.items():
        for op in ops.values():
            # every error is OpenAI's error JSON; FastAPI's 422 shape is never sent
            assert "422" not in op["responses"]
            if path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
                assert op["responses"]["default"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"}
                assert op["security"] == [{"bearer": []}]  # the live server requires API keys
            else:
                assert "security" not in op
    assert schema["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]


def test_no_auth_scheme_without_api_keys(server):
    config = server.ctx.config
    open_config = type(config)(model_name=config.model_name, api_keys=())
    schema = create_app(server.ctx.engine, open_config).openapi()
    assert "securitySchemes" not in schema["components"]
    assert all("security" not in op for ops in schema["paths"].values() for op in ops.values())


def test_validates_as_openapi_if_the_validator_is_installed(schema):
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(schema)


def test_docs_pages_are_off(server):
    with httpx.Client(base_url=server.base_url) as c:
        assert c.get("/docs").status_code == 404 and c.get("/redoc").status_code == 404
