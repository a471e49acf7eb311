"""Raw HTTP for the probes: bytes on a socket, so bodies can be truncated, invalid or oversized."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from loadtests.metrics_snapshot import samples


@dataclass
class Reply:
    status: int | None  # None: the connection closed or timed out without a status line
    body: bytes


def raw_request(url: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                declared_length: int | None = None, timeout: float = 60.0, half_close: bool = False) -> Reply:
    """Send one request exactly as given and read the whole reply (Connection: close)."""
    parts = urlsplit(url)
    head = {"Host": parts.netloc, "Connection": "close", "Content-Type": "application/json", **(headers or {})}
    if method not in ("GET", "HEAD") or body:
        head["Content-Length"] = str(len(body) if declared_length is None else declared_length)
    request = f"{method} {path} HTTP/1.1\r\n".encode("latin-1", "replace")
    request += b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in head.items()) + b"\r\n" + body
    data = b""
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
            sock.sendall(request)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        pass
    if not data.startswith(b"HTTP/1."):
        return Reply(None, data)
    status_line, _, rest = data.partition(b"\r\n")
    try:
        status = int(status_line.split()[1])
    except (IndexError, ValueError):
        return Reply(None, data)
    return Reply(status, rest.partition(b"\r\n\r\n")[2])


def post_json(url: str, path: str, obj: object, headers: dict[str, str] | None = None, timeout: float = 120.0) -> Reply:
    return raw_request(url, "POST", path, json.dumps(obj).encode(), headers, timeout=timeout)


def metric_value(url: str, name: str) -> float | None:
    """The sum of `name`'s samples in /metrics, over every label set, e.g. every served model (None when absent)."""
    reply = raw_request(url, "GET", "/metrics", timeout=10)
    values = [v for (sample, _), v in samples(reply.body.decode("utf-8", "replace")).items() if sample == name]
    return sum(values) if values else None
