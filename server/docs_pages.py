"""/docs (Swagger UI) and /redoc from assets served by this server, so both work with no network.

FastAPI's own pages load Swagger UI and ReDoc from a CDN: blank on an air-gapped machine or in a
private network. The JavaScript and CSS come from the `fastapi-offline` package (pinned in
requirements.txt) and are served under ASSETS; the pages are FastAPI's own HTML pointed at them.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from server import routes

ASSETS = "/docs-assets"
ASSET_DIR = Path(fastapi_offline.__file__).parent / "static"  # swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js


# ReDoc's side menu always shows Redocly's logo from its CDN (a failed request offline): an empty image instead.
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
EMPTY_SVG = b"data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E"


def redoc_script() -> bytes:
    """redoc.standalone.js with its one network reference replaced (checked, so a new ReDoc cannot slip one in)."""
    script = (ASSET_DIR / "redoc.standalone.js").read_bytes()
    if script.count(REDOC_LOGO) != 1:
        raise RuntimeError(f"{ASSET_DIR / 'redoc.standalone.js'}: expected Redocly's logo URL once; the pinned "
                           "fastapi-offline changed, recheck server/docs_pages.py")
    return script.replace(REDOC_LOGO, EMPTY_SVG)


def register(app: FastAPI, openapi_url: str = "/openapi.json") -> None:
    """Add /docs, /docs/oauth2-redirect, /redoc and the assets they load (app built with docs_url=redoc_url=None)."""
    redoc_js = redoc_script()

    @app.get(f"{ASSETS}/redoc.standalone.js", include_in_schema=False)
    async def redoc_asset() -> Response:  # before the mount, which serves the other assets as they are
        return Response(redoc_js, media_type="text/javascript")

    app.mount(ASSETS, StaticFiles(directory=ASSET_DIR), name="docs-assets")

    @app.get(routes.DOCS.path, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=openapi_url, title=f"{app.title} - Swagger UI",
                                   oauth2_redirect_url="/docs/oauth2-redirect",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url="/favicon.ico")

    @app.get(routes.DOCS_OAUTH.path, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(routes.REDOC.path, include_in_schema=False)
    async def redoc() -> HTMLResponse:
        # with_google_fonts=False: the fonts are a CDN request too; ReDoc falls back to the system fonts
        return get_redoc_html(openapi_url=openapi_url, title=f"{app.title} - ReDoc", redoc_js_url=f"{ASSETS}/redoc.standalone.js",
                              redoc_favicon_url="/favicon.ico", with_google_fonts=False)
