"""POST /v1/perplexity/text: a whole test set as the raw request body (text/plain), e.g.

    curl -s --data-binary @data/wikitext-2/test.txt -H 'Content-Type: text/plain' \
        'http://127.0.0.1:8000/v1/perplexity/text?stride=128'

The body is one document (the same scoring as /v1/perplexity with {"text": body}). It has its own
body limit, TEXT_BODY_LIMIT, instead of the server's JSON limit: memory stays proportional to it
(the body, its token ids and one log-probability per token), and the engine scores the document
window by window like any perplexity request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError

from server.errors import ERRORS, APIError, invalid
from server.native_schemas import PerplexityRequest, PerplexityResponse
from server.routes import PERPLEXITY_TEXT
from server.service import ServedModels
from server.settings import Settings

TEXT_BODY_LIMIT = 32 * 1024 * 1024  # 25x WikiText-2 test (1.26 MB)
BODY = {
    "requestBody": {"required": True, "description": f"UTF-8 text, at most {TEXT_BODY_LIMIT} bytes",
                    "content": {"text/plain": {"schema": {"type": "string", "minLength": 1}}}},
    "parameters": [
        {"name": "stride", "in": "query", "required": False, "description": "sliding-window stride (default: half the context)",
         "schema": {"type": "integer", "minimum": 1}},
        {"name": "return_logprobs", "in": "query", "required": False, "schema": {"type": "boolean", "default": False}},
        {"name": "model", "in": "query", "required": False, "description": "served model id (default: the first --checkpoint)",
         "schema": {"type": "string"}},
    ],
}


def _query(request: Request) -> tuple[int | None, bool]:
    """(stride, return_logprobs) from the query string; errors name the parameter like body fields."""
    stride_raw = request.query_params.get("stride")
    stride = None
    if stride_raw is not None:
        if not stride_raw.isdigit() or int(stride_raw) < 1:
            raise invalid("stride", f"must be an integer >= 1, got {stride_raw!r}")
        stride = int(stride_raw)
    lp_raw = request.query_params.get("return_logprobs", "false")
    if lp_raw not in ("true", "false"):
        raise invalid("return_logprobs", f"must be true or false, got {lp_raw!r}")
    return stride, lp_raw == "true"


def body_limit(served: ServedModels, settings: Settings) -> tuple[int, str]:
    """This route's body limit and why: TEXT_BODY_LIMIT (or the JSON limit, if larger), lowered to the bytes
    --max-score-tokens tokens can cover, so a body that must have too many tokens is refused before it is read."""
    limit = max(TEXT_BODY_LIMIT, settings.max_body_bytes)
    per_token = [svc.encoder.max_token_bytes for svc in served]
    if all(per_token):
        bound = settings.max_score_tokens * max(per_token)  # type: ignore[type-var]
        if bound < limit:
            return bound, f" (--max-score-tokens {settings.max_score_tokens} tokens of at most {max(per_token)} bytes each)"
    return limit, ""


def register(app: FastAPI, served: ServedModels,
             score: Callable[[PerplexityRequest, Request], Awaitable[Response]]) -> None:
    """Add the raw-text perplexity route; `score` is the /v1/perplexity handler."""

    context = max(svc.context for svc in served)
    extra = {**BODY, "parameters": [{**BODY["parameters"][0], "schema": {"type": "integer", "minimum": 1, "maximum": context}},
                                    *BODY["parameters"][1:]]}

    @app.post(PERPLEXITY_TEXT.path, response_model=PerplexityResponse, responses=ERRORS, tags=["native"], openapi_extra=extra)
    async def perplexity_text(request: Request) -> Any:
        stride, return_logprobs = _query(request)
        raw = await request.body()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise APIError(400, f"body: not valid UTF-8 (byte {exc.start})", param="body", code="invalid_utf8") from None
        try:
            body = PerplexityRequest(text=text, stride=stride, return_logprobs=return_logprobs,
                                     model=request.query_params.get("model"))
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
        return await score(body, request)
