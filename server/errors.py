"""API errors and the one error body of docs/ARCHITECTURE.md (Serving contract): {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# The error answers a route declares (FastAPI `responses=`); server/openapi.py completes them per route.
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid input (the error names the field)"},
    401: {"description": "missing or wrong API key"},
    413: {"description": "body too large"},
    503: {"description": "queue full or not ready (see Retry-After)"},
}
TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before", "function-plain", "function-wrap"}


class APIError(Exception):
    """An error answered with the standard body; `reason` feeds chiar_request_errors_total."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", reason: str = "validation", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_
        self.reason = reason
        self.headers = headers or {}


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    """400 naming the field; the message starts with the field name."""
    return APIError(400, f"{param}: {message}", param=param, code=code)


def overloaded(retry_after: int, message: str = "server is at capacity, retry later") -> APIError:
    return APIError(503, message, code="overloaded", type_="overloaded_error", reason="overloaded",
                    headers={"Retry-After": str(retry_after)})


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status, headers=exc.headers)


def error_bytes(message: str, type_: str, param: str | None, code: str | None) -> bytes:
    return json.dumps(error_body(message, type_, param, code)).encode()


def _param_path(loc: tuple[Any, ...]) -> tuple[str | None, str]:
    """('body', 'stop', 'list[str]', 2) -> ('stop', 'stop[2]'); drops union-member type tags."""
    parts = [p for p in loc if p != "body" and not (isinstance(p, str) and (p in TYPE_TAGS or "[" in p))]
    if not parts or not isinstance(parts[0], str):
        return None, "body"
    path = parts[0]
    for p in parts[1:]:
        path += f"[{p}]" if isinstance(p, int) else f".{p}"
    return parts[0], path


def validation_error(exc: RequestValidationError) -> APIError:
    """Turn FastAPI/pydantic validation errors into one 400 naming the first bad field."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "invalid"}
    if first.get("type") == "json_invalid":
        pos = first["loc"][-1] if len(first["loc"]) > 1 else "?"
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"body: invalid JSON at position {pos}: {detail}", param="body", code="invalid_json")
    param, path = _param_path(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "model_attributes_type":
        return APIError(400, "body: must be a JSON object", param="body", code="invalid_json")
    if first.get("type") == "missing":
        return APIError(400, f"{path}: field required", param=param, code="missing")
    msg = msg.removeprefix("Value error, ")
    return APIError(400, f"{path}: {msg}", param=param, code=str(first.get("type", "invalid_value")))


def install_handlers(app: Any, on_error: Any) -> None:
    """Register handlers; `on_error(request, APIError)` records the error metric."""

    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        on_error(request, exc)
        return error_response(exc)

    async def request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc)
        on_error(request, err)
        return error_response(err)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        err = APIError(exc.status_code, str(exc.detail), code=code, reason="validation", headers=dict(exc.headers or {}))
        if exc.status_code < 500 and exc.status_code != 404:
            on_error(request, err)
        return error_response(err)

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        err = APIError(500, f"internal error: {type(exc).__name__}", code="internal_error", type_="server_error", reason="internal")
        on_error(request, err)
        return error_response(err)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal)
