"""The route registry (server/routes.py) is the app's routes: auth, the OpenAPI document and the request
metrics read it, so a route missing from it would be unauthenticated-by-accident or mislabelled."""

from __future__ import annotations

import re
from pathlib import Path

from starlette.routing import Mount

from server import routes
from tests.support import in_process_app


def test_the_registry_lists_exactly_the_apps_routes(tiny_checkpoint: Path) -> None:
    app, _ = in_process_app(tiny_checkpoint)
    paths = {re.sub(r":\w+}", "}", route.path) for route in app.routes if not isinstance(route, Mount)}
    mounts = {route.path + "/" for route in app.routes if isinstance(route, Mount)}
    files = {path for path in paths if path.startswith(routes.STATIC_PREFIXES)}  # a static file served by a route
    assert paths - files == set(routes.BY_PATH)
    assert mounts == set(routes.STATIC_PREFIXES)
    assert all(routes.is_public(prefix + "x") for prefix in mounts)
    assert routes.endpoint_label("/v1/models/chiar-tiny") == "other"  # bounded label values
    assert routes.endpoint_label("/v1/completions") == "/v1/completions"
