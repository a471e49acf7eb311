"""The one route registry: every path the server answers, with what auth, the OpenAPI document and the
request metrics need to know about it (public or not, engine work, a `model` choice, an event stream).

The route modules register their handlers at these paths; tests/server/test_routes.py checks that the
app's routes and this table are the same set.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    path: str
    public: bool = False  # answered without the API key (a browser fetches it without a header)
    engine: bool = False  # runs engine work: may answer 503 (queue full, warming up) and 504 (timeout)
    model: bool = False  # takes a `model` (body field, query parameter or path): 404 when it is not served
    events: str | None = None  # with `stream: true`, the server-sent events it answers with (for the document)


GENERATE = Route("/v1/generate", engine=True, model=True, events=(
    '`data: {"type": "token", ...}` per token batch, then `data: {"type": "done", ...}` (the GenerateResponse '
    "fields), then `data: [DONE]`"))
PERPLEXITY = Route("/v1/perplexity", engine=True, model=True)
PERPLEXITY_TEXT = Route("/v1/perplexity/text", engine=True, model=True)
NATIVE_TOKENIZE = Route("/v1/tokenize", model=True)
COMPLETIONS = Route("/v1/completions", engine=True, model=True, events=(
    "`data: <text_completion chunk>` events (the CompletionResponse shape, one choice each), an optional usage "
    "chunk with `choices: []` (`stream_options.include_usage`), then `data: [DONE]`"))
CHAT = Route("/v1/chat/completions", engine=True, model=True, events=(
    "`data: <chat.completion.chunk>` events (ChatCompletionChunk), an optional usage chunk with `choices: []`, "
    "then `data: [DONE]`"))
MODELS = Route("/v1/models")
MODEL = Route("/v1/models/{model_id}", model=True)
TOKENIZE = Route("/tokenize", model=True)
DETOKENIZE = Route("/detokenize", model=True)
TOKENIZER_INFO = Route("/tokenizer_info", model=True)
HEALTH = Route("/health", public=True)
READY = Route("/ready", public=True)
METRICS = Route("/metrics", public=True)
PLAYGROUND = Route("/", public=True)
FAVICON = Route("/favicon.ico", public=True)
DOCS = Route("/docs", public=True)
DOCS_OAUTH = Route("/docs/oauth2-redirect", public=True)
REDOC = Route("/redoc", public=True)
OPENAPI = Route("/openapi.json", public=True)

ROUTES: tuple[Route, ...] = (GENERATE, PERPLEXITY, PERPLEXITY_TEXT, NATIVE_TOKENIZE, COMPLETIONS, CHAT, MODELS, MODEL,
                             TOKENIZE, DETOKENIZE, TOKENIZER_INFO, HEALTH, READY, METRICS, PLAYGROUND, FAVICON, DOCS,
                             DOCS_OAUTH, REDOC, OPENAPI)
BY_PATH = {route.path: route for route in ROUTES}
STATIC_PREFIXES = ("/static/", "/docs-assets/")  # mounted files: the playground's and the docs pages' (public)
PUBLIC = frozenset(route.path for route in ROUTES if route.public)


def is_public(path: str) -> bool:
    return path in PUBLIC or path.startswith(STATIC_PREFIXES)


def endpoint_label(path: str) -> str:
    """Bounded metric label values: a registered path, 'static' or 'other' (unknown paths, /v1/models/<id>)."""
    if path in BY_PATH:
        return path
    return "static" if path.startswith(STATIC_PREFIXES) else "other"
