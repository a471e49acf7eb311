"""The malformed-input corpus: (case id, method, path, body, declared Content-Length or None)."""

from __future__ import annotations

import json

Case = tuple[str, str, str, bytes, "int | None"]

POST_ENDPOINTS = ("/v1/generate", "/v1/completions", "/v1/perplexity", "/v1/tokenize")
GET_ENDPOINTS = ("/health", "/ready", "/metrics", "/v1/models", "/", "/openapi.json")
MARKER = "SECRET-PROMPT-MARKER-7f3a"  # must never appear in the server log
UNDERFLOW = {"temperature": [1e-45, 5e-324, 1e-300], "top_p": [1e-45, 5e-324, 1e-300]}


def _valid(path: str) -> dict:
    return {
        "/v1/generate": {"prompt": f"{MARKER} the", "max_new_tokens": 2},
        "/v1/completions": {"prompt": f"{MARKER} the", "max_tokens": 2},
        "/v1/perplexity": {"text": f"{MARKER} the cat sat"},
        "/v1/tokenize": {"text": f"{MARKER} the"},
    }[path]


def _text_field(path: str) -> str:
    return {"/v1/generate": "prompt", "/v1/completions": "prompt", "/v1/perplexity": "text", "/v1/tokenize": "text"}[path]


def malformed_cases(context: int, short: bool) -> list[Case]:
    """Every endpoint gets truncation, nesting, size, encoding and type abuse."""
    cases: list[Case] = []
    for path in POST_ENDPOINTS:
        valid = json.dumps(_valid(path)).encode()
        field = _text_field(path)
        cuts = (1, len(valid) // 3, len(valid) - 1) if short else range(1, len(valid), max(1, len(valid) // 12))
        cases += [(f"{path} truncated json at {n}", "POST", path, valid[:n], None) for n in cuts]
        cases.append((f"{path} body shorter than Content-Length", "POST", path, valid, len(valid) + 50))
        cases.append((f"{path} empty body", "POST", path, b"", None))
        depth = 2000 if short else 100_000
        cases.append((f"{path} nested arrays x{depth}", "POST", path, b"[" * depth + b"]" * depth, None))
        nested = json.dumps({field: "x"})[:-1].encode() + b', "n": ' + b'{"a":' * 500 + b"1" + b"}" * 500 + b"}"
        cases.append((f"{path} nested objects in an unknown field", "POST", path, nested, None))
        cases.append((f"{path} over the body limit", "POST", path, b'{"' + field.encode() + b'": "' + b"a" * 1_100_000 + b'"}', None))
        words = 20_000 if short else 180_000  # scoring all of it is the unbounded-CPU case
        cases.append((f"{path} huge text within the body limit ({words} words)", "POST", path,
                      json.dumps({**_valid(path), field: "word " * words}).encode(), None))
        cases.append((f"{path} over-long text", "POST", path, json.dumps({**_valid(path), field: "word " * (context * 4)}).encode(), None))
        cases.append((f"{path} invalid utf-8", "POST", path, b'{"' + field.encode() + b'": "caf\xe9 \xff\xfe"}', None))
        cases.append((f"{path} lone surrogate", "POST", path, b'{"' + field.encode() + b'": "a \\ud800 b"}', None))
        cases.append((f"{path} low surrogate first", "POST", path, b'{"' + field.encode() + b'": "\\udc00\\ud800"}', None))
        cases.append((f"{path} NUL escape in text", "POST", path, json.dumps({**_valid(path), field: "a\u0000b"}).encode(), None))
        cases.append((f"{path} raw NUL bytes", "POST", path, b'{"' + field.encode() + b'": "a\x00b"}\x00', None))
        cases.append((f"{path} not an object", "POST", path, b'"just a string"', None))
        cases.append((f"{path} null", "POST", path, b"null", None))
        cases.append((f"{path} number as text", "POST", path, json.dumps({field: 1e308}).encode(), None))
        cases.append((f"{path} huge integer", "POST", path, json.dumps({**_valid(path), "seed": 10**400}).encode(), None))
        cases.append((f"{path} duplicate keys", "POST", path, b'{"' + field.encode() + b'": "a", "' + field.encode() + b'": 5}', None))
        cases.append((f"{path} GET instead of POST", "GET", path, b"", None))
        cases.append((f"{path} PUT", "PUT", path, valid, None))
    for bad_ids in ([10**9], [-1], [2**63], [[10**9]], [[]], [], [1.5], [[1, "a"]]):
        cases.append((f"/v1/completions token ids {json.dumps(bad_ids)}", "POST", "/v1/completions",
                      json.dumps({"prompt": bad_ids, "max_tokens": 1}).encode(), None))
    for path in ("/v1/generate", "/v1/completions"):
        tokens = "max_new_tokens" if path == "/v1/generate" else "max_tokens"
        for value in (10**18, -(10**18), 2**63):
            cases.append((f"{path} {tokens}={value}", "POST", path, json.dumps({**_valid(path), tokens: value}).encode(), None))
        cases.append((f"{path} top_k=10**18", "POST", path, json.dumps({**_valid(path), "top_k": 10**18}).encode(), None))
        cases.append((f"{path} temperature=1e308", "POST", path, json.dumps({**_valid(path), "temperature": 1e308}).encode(), None))
    for path in GET_ENDPOINTS:
        cases.append((f"{path} odd query string", "GET", path + "?a=%ff%00&b=" + "x" * 4000, b"", None))
        cases.append((f"{path} POST with junk", "POST", path, b"\xff\xfe\x00junk", None))
    cases.append(("unknown path", "GET", "/v1/../../etc/passwd", b"", None))
    cases.append(("static traversal", "GET", "/static/../server/app.py", b"", None))
    return cases


def underflow_cases(short: bool) -> list[Case]:
    """Sampling values that underflow float32 (temperature or top_p denormal/zero after conversion)."""
    cases: list[Case] = []
    for path in ("/v1/generate", "/v1/completions"):
        for name, values in UNDERFLOW.items():
            for value in values[:1] if short else values:
                cases.append((f"{path} {name}={value!r}", "POST", path, json.dumps({**_valid(path), name: value}).encode(), None))
    return cases
