"""The FastAPI app: wires the protocol modules, the error handlers, the OpenAPI document and the
middleware around the served models. Each protocol registers its own routes (server/routes.py lists them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server import chat, docs_pages, native_api, openai_api, openapi, ops, perplexity_text, tokenizer_api
from server.body_timeout import BodyTimeout
from server.errors import install_handlers
from server.metrics import NO_MODEL, Metrics
from server.middleware import BearerAuth, BodyBudget, BodyLimit, RequestMetrics
from server.openapi_limits import DocLimits, ModelLimits
from server.routes import PERPLEXITY_TEXT, endpoint_label
from server.service import ServedModels, Service
from server.settings import Settings


def create_app(settings: Settings, models: list[Service], metrics: Metrics) -> FastAPI:
    """The app serving `models` (one Service per model and engine; the first is the default)."""
    served = ServedModels(models)
    engines = [svc.engine for svc in served]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for engine in engines:
            engine.start()
        yield
        # all engines drain together: each gets the whole drain timeout, not one after the other
        await asyncio.gather(*(asyncio.to_thread(engine.stop, settings.drain_timeout) for engine in engines))

    app = FastAPI(title="CHIAR-Former inference server", version="0.1.0", lifespan=lifespan, docs_url=None,
                  redoc_url=None,
                  description="Hard-gated CHIAR-Former: native generate/perplexity, OpenAI-compatible completions.")
    app.state.served = served
    install_handlers(app, lambda request, err: metrics.error(endpoint_label(request.url.path), err.reason,
                                                             getattr(request.state, "model", NO_MODEL)))
    ops.register(app, served, metrics)
    docs_pages.register(app)  # /docs and /redoc with their assets served here (offline)
    native_api.register(app, served)
    openai_api.register(app, served)
    chat.register(app, served)
    tokenizer_api.register(app, served)
    openapi.install(app, api_key=settings.api_key is not None, limits=DocLimits(
        vocab_size=max(svc.config.vocab_size for svc in served), max_prompts=settings.max_prompts,
        models=tuple(ModelLimits(svc.name, svc.context, svc.max_new_tokens) for svc in served)))
    add_middleware(app, settings, served, metrics)
    return app


def add_middleware(app: FastAPI, settings: Settings, served: ServedModels, metrics: Metrics) -> None:
    """The middleware stack; added last = outermost (request metrics see every answer, auth runs before bodies are read)."""
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, on_error=metrics.error,
                       budget=BodyBudget(settings.max_inflight_body_bytes),
                       per_path={PERPLEXITY_TEXT.path: perplexity_text.body_limit(served, settings)})
    app.add_middleware(BodyTimeout, seconds=settings.body_timeout)
    app.add_middleware(BearerAuth, api_key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestMetrics, metrics=metrics)
