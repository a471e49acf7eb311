"""Pure ASGI middleware: request metrics, bearer auth, body-size limit and UTF-8 check (paths: server/routes.py)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_bytes
from server.metrics import NO_MODEL, Metrics
from server.routes import endpoint_label, is_public

HEAVY_BODY = 65536  # bodies this large take milliseconds of the event loop to parse and validate
MAX_PAUSE = 0.05  # seconds the loop is left to other work after one big body's parsing step, at most


async def send_error(send: Send, status: int, message: str, type_: str, param: str | None, code: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_bytes(message, type_, param, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """chiar_request_duration_seconds{model,endpoint,status}; streamed responses count until their last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            model = scope.get("state", {}).get("model", NO_MODEL)  # set by the route once it picked a model
            self.metrics.request_duration.labels(model, endpoint_label(scope["path"]), str(status[0])).observe(time.perf_counter() - start)


class BearerAuth:
    """With an API key, everything but the public paths needs `Authorization: Bearer KEY` (constant-time compare)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.digest is None or scope["type"] != "http" or is_public(scope["path"]) or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        given = hashlib.sha256(token.strip()).digest()
        if scheme.lower() == b"bearer" and hmac.compare_digest(given, self.digest):
            await self.app(scope, receive, send)
            return
        message = "missing API key (send 'Authorization: Bearer KEY')" if not header else "invalid API key"
        await send_error(send, 401, message, "authentication_error", None, "invalid_api_key",
                         [(b"www-authenticate", b'Bearer realm="chiar"')])


class BodyBudget:
    """Bytes of request bodies that in-flight requests hold (`limit` at most); used on the event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


class BodyLimit:
    """Buffer request bodies up to `limit` bytes (413 beyond; `per_path` overrides it with (limit, why)), hold at most
    `budget` bytes of bodies over all in-flight requests (503 + Retry-After beyond) and reject non-UTF-8 JSON (400).

    A body's bytes stay booked until its request has answered: the body, its parsed text and its token ids
    live that long. Bodies of HEAVY_BODY bytes or more enter the app one at a time until its first wait, then
    leave the loop to other work for as long as that step took: the loop never queues more than one body's JSON
    parsing and validation (up to ~20 ms for 1 MiB) ahead of /health, and spends at most half its time on them."""

    def __init__(self, app: ASGIApp, limit: int, on_error: Callable[[str, str], None], budget: BodyBudget,
                 per_path: dict[str, tuple[int, str]] | None = None) -> None:
        self.app = app
        self.default = limit
        self.per_path = per_path or {}
        self.on_error = on_error
        self.budget = budget
        self.parsing = asyncio.Semaphore(1)

    def _limit(self, path: str) -> tuple[int, str]:
        limit, why = self.per_path.get(path, (self.default, ""))
        if limit > self.budget.limit:
            return self.budget.limit, " (the server's --max-inflight-body-bytes)"
        return limit, why

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        booked = [0]
        try:
            body = await self._read(scope, receive, send, booked)
            if body is None:
                return

            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            if len(body) < HEAVY_BODY:
                await self.app(scope, replay, send)
                return
            async with self.parsing:  # one big body at a time is parsed on the event loop (see HEAVY_BODY)
                started = time.perf_counter()
                app = asyncio.ensure_future(self.app(scope, replay, send))
                await asyncio.sleep(0)  # runs after the app's first step: parsing, validation, checks, up to its first wait
                # as long again for everything else (/health, streams, replies): big bodies get at most half the loop
                await asyncio.sleep(min(MAX_PAUSE, time.perf_counter() - started))
            try:
                await app
            finally:
                app.cancel()  # a no-op once done; stops the app when this request is cancelled
        finally:
            self.budget.give(booked[0])

    async def _refuse(self, send: Send, label: str, status: int, message: str, code: str) -> None:
        self.on_error(label, "overloaded" if status == 503 else "validation")
        if status == 503:
            await send_error(send, 503, message, "overloaded_error", None, code, [(b"retry-after", b"1")])
        else:
            await send_error(send, status, message, "invalid_request_error", "body", code)

    async def _read(self, scope: Scope, receive: Receive, send: Send, booked: list[int]) -> bytes | None:
        """The whole body, booked against the budget as it arrives; None when a refusal was sent (or the client left)."""
        headers = dict(scope["headers"])
        label = endpoint_label(scope["path"])
        limit, why = self._limit(scope["path"])
        too_large = f"body: request body exceeds the limit of {limit} bytes{why}"
        busy = (f"server is holding {self.budget.held} bytes of request bodies; with this one it would exceed "
                f"--max-inflight-body-bytes {self.budget.limit}, retry later")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                await self._refuse(send, label, 413, too_large, "body_too_large")
                return None
            if not self.budget.take(int(declared)):  # booked before a byte is read
                await self._refuse(send, label, 503, busy, "overloaded")
                return None
            booked[0] = int(declared)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(send, label, 413, too_large, "body_too_large")
                return None
            if size > booked[0]:
                if not self.budget.take(size - booked[0]):
                    await self._refuse(send, label, 503, busy, "overloaded")
                    return None
                booked[0] = size
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        chunks.clear()
        if b"json" in headers.get(b"content-type", b"application/json"):
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as exc:
                await self._refuse(send, label, 400, f"body: not valid UTF-8 (byte {exc.start})", "invalid_utf8")
                return None
        return body
