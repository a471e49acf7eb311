"""Operations and the page: /health, /ready, /metrics, the playground (/, /favicon.ico, /static/*)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from server import routes
from server.metrics import Metrics
from server.service import ServedModels

STATIC = Path(__file__).parent / "static"


def register(app: FastAPI, served: ServedModels, metrics: Metrics) -> None:
    """Add the health, readiness, metrics and playground routes to `app`."""
    engines = [svc.engine for svc in served]

    @app.get(routes.HEALTH.path, tags=["ops"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(routes.READY.path, tags=["ops"], responses={503: {"description": "loading or warming up"}})
    async def ready() -> JSONResponse:
        """200 once every engine is warm; 503 while any is loading, draining or failed (that state is reported)."""
        statuses = [engine.status() for engine in engines]
        if all(status.ready for status in statuses):
            return JSONResponse({"status": "ready", "model": served.default.name, "models": [svc.name for svc in served]})
        state = "failed" if any(s.failed for s in statuses) else "draining" if any(s.draining for s in statuses) else "loading"
        return JSONResponse({"status": state}, status_code=503,
                            headers={"Retry-After": str(max(s.retry_after for s in statuses))})

    @app.get(routes.METRICS.path, tags=["ops"])
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get(routes.PLAYGROUND.path, include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get(routes.FAVICON.path, include_in_schema=False)
    async def favicon() -> FileResponse:  # browsers ask for it whatever the page links
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
