"""Strict request types over raw HTTP: no bool-as-int, no string-as-number, no 0/1-as-bool, no
booleans as token ids, no fractions where integers go (1.0 is an integer, as in JSON Schema); each gets a
400 whose message starts with the offending field."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import ServerProcess

CASES = [
    # (id, path, body, param)
    ("bool-as-max-new-tokens", "/v1/generate", {"prompt": "x", "max_new_tokens": True}, "max_new_tokens"),
    ("string-as-max-new-tokens", "/v1/generate", {"prompt": "x", "max_new_tokens": "10"}, "max_new_tokens"),
    # 2.0 is an integer in JSON Schema (accepted, see test_well_typed_still_accepted); 2.5 is not
    ("fraction-as-max-new-tokens", "/v1/generate", {"prompt": "x", "max_new_tokens": 2.5}, "max_new_tokens"),
    ("fraction-as-token-id", "/v1/completions", {"prompt": [1, 2.5], "max_tokens": 1}, "prompt"),
    ("bool-as-temperature", "/v1/generate", {"prompt": "x", "temperature": True}, "temperature"),
    ("string-as-temperature", "/v1/generate", {"prompt": "x", "temperature": "0.5"}, "temperature"),
    ("string-as-seed", "/v1/generate", {"prompt": "x", "seed": "7"}, "seed"),
    ("bool-as-top-k", "/v1/generate", {"prompt": "x", "top_k": False}, "top_k"),
    ("int-as-stream", "/v1/generate", {"prompt": "x", "stream": 1}, "stream"),
    ("string-as-stream", "/v1/generate", {"prompt": "x", "stream": "true"}, "stream"),
    ("bool-as-stride", "/v1/perplexity", {"text": "some words here", "stride": True}, "stride"),
    ("int-as-return-logprobs", "/v1/perplexity", {"text": "some words", "return_logprobs": 1}, "return_logprobs"),
    ("int-as-add-bos", "/v1/tokenize", {"text": "x", "add_bos": 0}, "add_bos"),
    ("bools-as-token-ids", "/v1/completions", {"prompt": [True, False], "max_tokens": 1}, "prompt"),
    ("nested-bool-token-ids", "/v1/completions", {"prompt": [[False]], "max_tokens": 1}, "prompt"),
    ("bool-as-max-tokens", "/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("string-as-n", "/v1/completions", {"prompt": "x", "n": "2"}, "n"),
    ("int-as-echo", "/v1/completions", {"prompt": "x", "echo": 1}, "echo"),
    ("string-as-logprobs", "/v1/completions", {"prompt": "x", "logprobs": "1"}, "logprobs"),
]


@pytest.mark.parametrize("path, body, param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_loose_type_is_refused(server: ServerProcess, path: str, body: dict, param: str) -> None:
    response = httpx.post(server.url + path, content=json.dumps(body).encode(),
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param), error


@pytest.mark.parametrize("path, body", [
    ("/v1/generate", {"prompt": "x", "max_new_tokens": 1, "temperature": 0}),  # an integer is a fine float
    ("/v1/completions", {"prompt": [[5, 6]], "max_tokens": 1, "temperature": 0}),
    ("/v1/completions", {"prompt": [5, 6], "max_tokens": 1, "temperature": 1}),
    ("/v1/tokenize", {"text": "x", "add_bos": False}),
    ("/v1/generate", {"prompt": "x", "max_new_tokens": 2.0, "temperature": 0}),  # integral: an integer in JSON Schema
    ("/v1/completions", {"prompt": [5.0, 6], "max_tokens": 1.0, "n": 1.0, "temperature": 0}),
])
def test_well_typed_still_accepted(server: ServerProcess, path: str, body: dict) -> None:
    response = httpx.post(server.url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
