"""The OpenAPI document as the server really behaves (FastAPI's generated one, corrected once).

- Invalid input is a 400 with the error body, never FastAPI's 422; 401/404/413/503/504 carry the same body.
- Streaming routes also answer `text/event-stream` (documented with the event format).
- /metrics is Prometheus text, not JSON.
- With an API key configured, a bearer security scheme covers every non-public route.
- Every limit the server enforces is declared (server/openapi_limits.py); the sampling fields are one set of
  components (server/sampling_params.py) that every request refers to.
- Which routes are public, run engine work or take a `model`: the route registry, server/routes.py.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from server.openapi_limits import DocLimits, declare_limits
from server.routes import BY_PATH
from server.sampling_params import COMPONENTS as SAMPLING
from server.sampling_params import FIELDS as SAMPLING_FIELDS


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error answer: {"error": {message, type, param, code}}."""

    error: ErrorDetail


ERROR_TEXT = {
    400: "invalid input; `error.param` names the field and `error.message` starts with it",
    401: "missing or wrong API key (`Authorization: Bearer KEY`)",
    404: "unknown model (`code: model_not_found`) or path",
    405: "method not allowed (see the Allow header)",
    413: "request body over the size limit",
    503: "queue full, warming up or draining; retry after Retry-After seconds",
    504: "the request ran past the server's request timeout",
}
# OpenAPI links: what a client does next with an answer (schemathesis' stateful phase follows them).
LINKS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("/v1/models", "get"): {
        "GetModel": {"operationRef": "#/paths/~1v1~1models~1{model_id}/get", "parameters": {"model_id": "$response.body#/data/0/id"}},
        "GetTokenizer": {"operationRef": "#/paths/~1tokenizer_info/get", "parameters": {"model": "$response.body#/data/0/id"}}},
    ("/tokenize", "post"): {
        "Detokenize": {"operationRef": "#/paths/~1detokenize/post", "requestBody": {"tokens": "$response.body#/tokens"}}},
    ("/v1/tokenize", "post"): {
        "Detokenize": {"operationRef": "#/paths/~1detokenize/post", "requestBody": {"tokens": "$response.body#/token_ids"}},
        "ScorePrompt": {"operationRef": "#/paths/~1v1~1completions/post", "requestBody": {
            "prompt": "$response.body#/token_ids", "max_tokens": 0, "echo": True, "logprobs": 1}}},
    ("/detokenize", "post"): {
        "Tokenize": {"operationRef": "#/paths/~1tokenize/post", "requestBody": {"prompt": "$response.body#/prompt"}}},
}
STREAM_ERROR = " An error after the stream has started arrives as one `data: {\"error\": {...}}` event (the ErrorBody shape)."


def sse_event(path: str) -> dict[str, Any]:
    """One server-sent event as parsed by a client (the OpenAPI 3.2 SSE shape): `data` holds the JSON text."""
    payload = {"/v1/chat/completions": "ChatCompletionChunk", "/v1/completions": "CompletionResponse"}.get(path)
    data: dict[str, Any] = {"type": "string", "description": "JSON text, or the final `[DONE]`"}
    if payload:
        data["description"] += f" (JSON events have the {payload} shape)"
    return {"type": "object", "required": ["data"], "properties": {
        "data": data, "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}


def _error(status: int) -> dict[str, Any]:
    return {"description": ERROR_TEXT[status],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}


def _declare_vocab(schemas: dict[str, Any], vocab_size: int) -> None:
    """Token ids must be below the vocabulary size: say so wherever ids are accepted."""
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "integer" and node.get("minimum") == 0 and "maximum" not in node:
                node["maximum"] = vocab_size - 1
            if node.get("type") == "array" and isinstance(node.get("items"), dict) and node["items"].get("type") == "integer":
                node["items"].setdefault("minimum", 0)
                node["items"]["maximum"] = vocab_size - 1
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for name in ("DetokenizeRequest", "CompletionRequest"):
        if name in schemas:
            walk(schemas[name]["properties"].get("tokens") or schemas[name]["properties"].get("prompt"))


def _refer_sampling(schemas: dict[str, Any]) -> None:
    """Declare the sampling policy once: each request's temperature, top_p, top_k and seed refer to its components."""
    schemas.update(SAMPLING)
    for name, schema in schemas.items():
        if name in SAMPLING:
            continue
        for field, component in SAMPLING_FIELDS.items():
            prop = schema.get("properties", {}).get(field)
            if prop is None:
                continue
            ref = {"$ref": f"#/components/schemas/{component}"}
            if any(option.get("type") == "null" for option in prop.get("anyOf", [])):
                prop["anyOf"] = [ref, {"type": "null"}]
            else:
                kept = {key: prop[key] for key in ("title", "description", "default") if key in prop}
                prop.clear()  # the constraints (or an anyOf without null) are the component's
                prop.update({"allOf": [ref], **kept})


def _nonempty(node: dict[str, Any]) -> None:
    """minLength 1 on strings and minItems 1 on arrays, at every level of a prompt/text schema."""
    for option in node.get("anyOf", [node]):
        if option.get("type") == "string":
            option["minLength"] = 1
        elif option.get("type") == "array":
            option["minItems"] = 1
            _nonempty(option["items"])


def _declare_native(schemas: dict[str, Any], context: int) -> None:
    """What server/schemas.py's validators and the routes reject, said in the document.

    The validators stay the source of the behaviour (their error wording is part of the API); this
    keeps the document equal to them: no empty prompts or texts, only neutral values of the
    unsupported OpenAI options, strides up to the context.
    """
    def props(name: str) -> dict[str, Any]:
        return schemas.get(name, {}).get("properties", {})

    for name, field in (("GenerateRequest", "prompt"), ("PerplexityRequest", "text"), ("CompletionRequest", "prompt")):
        if field in props(name):
            _nonempty(props(name)[field])
    stride = props("PerplexityRequest").get("stride")
    for option in (stride or {}).get("anyOf", []):
        if option.get("type") == "integer":
            option["maximum"] = context
    neutral = {"presence_penalty": {"minimum": 0, "maximum": 0}, "frequency_penalty": {"minimum": 0, "maximum": 0},
               "best_of": {"minimum": 1, "maximum": 1}, "logit_bias": {"maxProperties": 0}, "suffix": {"maxLength": 0}}
    for field, bounds in neutral.items():
        for option in props("CompletionRequest").get(field, {}).get("anyOf", []):
            if option.get("type") != "null":
                option.update(bounds)


def build_openapi(app: FastAPI, api_key: bool, limits: DocLimits) -> dict[str, Any]:
    """FastAPI's document with the corrections listed in the module docstring."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorDetail, ErrorBody):
        schemas[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    _refer_sampling(schemas)
    from server.openai_schemas import ChatChunkChoice, ChatCompletionChunk, ChatDelta

    for model in (ChatDelta, ChatChunkChoice, ChatCompletionChunk):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schema.pop("$defs", None)
        schemas.setdefault(model.__name__, schema)
    _declare_vocab(schemas, limits.vocab_size)
    _declare_native(schemas, limits.context)
    declare_limits(schemas, limits)
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    if api_key:
        doc["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer",
                                                               "description": "the server's API key (CHIAR_API_KEY)"}}
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            wanted = {400, 413} if method == "post" else set()
            route = BY_PATH[path]
            if route.engine:
                wanted |= {503, 504}
            if route.model:
                wanted.add(404)
            if api_key and not route.public:
                wanted.add(401)
                op["security"] = [{"bearerAuth": []}]
            elif api_key:
                op["security"] = []
            for status in ERROR_TEXT:  # this table is the one source of error statuses (/ready keeps its own 503)
                if status in wanted:
                    responses[str(status)] = _error(status)
                elif path != "/ready":
                    responses.pop(str(status), None)
            if (path, method) in LINKS:
                responses.setdefault("200", {"description": "OK"})["links"] = LINKS[(path, method)]
            if route.events:
                ok = responses.setdefault("200", {"description": "OK"})
                ok["description"] = "JSON; with `stream: true` server-sent events: " + route.events + "." + STREAM_ERROR
                ok.setdefault("content", {})["text/event-stream"] = {"schema": sse_event(path)}
    metrics = doc.get("paths", {}).get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"]["200"] = {"description": "Prometheus text exposition format",
                                       "content": {"text/plain": {"schema": {"type": "string"}}}}
    return doc


def install(app: FastAPI, api_key: bool, limits: DocLimits) -> None:
    """Serve the corrected document at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, api_key, limits)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
