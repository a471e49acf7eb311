"""`stream_options` on both OpenAI routes: one definition, vLLM's continuous_usage_stats (what guidellm sends)."""

from __future__ import annotations

import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "Tell me about the city."}]
CONTINUOUS = {"include_usage": True, "continuous_usage_stats": True}


def check_continuous(chunks: list, n_choices: int, final_usage: object) -> None:
    """Every chunk carries usage; per choice the counts grow to the choice's total; the last chunk has the totals."""
    *body, last = chunks
    # the same totals (cached prompt tokens aside: the first request filled the prefix cache for the second)
    assert last.choices == [] and last.usage.model_dump(exclude={"prompt_tokens_details"}) == \
        final_usage.model_dump(exclude={"prompt_tokens_details"})
    assert last.usage.prompt_tokens_details.cached_tokens >= final_usage.prompt_tokens_details.cached_tokens
    seen: dict[int, int] = {}
    for chunk in body:
        (choice,) = chunk.choices
        assert chunk.usage is not None, chunk
        assert chunk.usage.total_tokens == chunk.usage.prompt_tokens + chunk.usage.completion_tokens
        assert chunk.usage.completion_tokens >= seen.get(choice.index, 0)
        seen[choice.index] = chunk.usage.completion_tokens
    assert sorted(seen) == list(range(n_choices))
    assert sum(seen.values()) == final_usage.completion_tokens


def test_chat_continuous_usage_stats(oai: openai.OpenAI) -> None:
    full = oai.chat.completions.create(model="chiar-tiny", messages=MESSAGES, max_tokens=6, n=2, seed=3, temperature=1.0)
    chunks = list(oai.chat.completions.create(model="chiar-tiny", messages=MESSAGES, max_tokens=6, n=2, seed=3,
                                              temperature=1.0, stream=True, stream_options=CONTINUOUS))
    check_continuous(chunks, 2, full.usage)
    assert {c.usage.prompt_tokens for c in chunks[:-1]} == {full.usage.prompt_tokens}


def test_completions_continuous_usage_stats(oai: openai.OpenAI) -> None:
    prompts = ["The history of", "A river runs"]
    full = oai.completions.create(model="chiar-tiny", prompt=prompts, max_tokens=5, seed=2, temperature=0.8)
    chunks = list(oai.completions.create(model="chiar-tiny", prompt=prompts, max_tokens=5, seed=2, temperature=0.8,
                                         stream=True, stream_options=CONTINUOUS))
    check_continuous(chunks, 2, full.usage)
    text = {i: "".join(c.choices[0].text for c in chunks[:-1] if c.choices[0].index == i) for i in range(2)}
    assert text == {c.index: c.text for c in full.choices}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_include_usage_alone_and_unknown_keys(client: httpx.Client, path: str) -> None:
    body = {"messages": MESSAGES} if "chat" in path else {"prompt": "The history of"}
    # OpenAI's include_obfuscation (or any newer key) is ignored like an unknown request field
    options = {"include_usage": True, "include_obfuscation": False}
    events = stream_events(client, path, {**body, "max_tokens": 3, "stream": True, "stream_options": options})
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1
    assert all(e["usage"] is None for e in events[:-1])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("options", "field"), [({"include_usage": 1}, "include_usage"),
                                                ({"continuous_usage_stats": "yes"}, "continuous_usage_stats")])
def test_stream_options_reject_non_booleans(client: httpx.Client, path: str, options: dict, field: str) -> None:
    body = {"messages": MESSAGES} if "chat" in path else {"prompt": "x"}
    r = client.post(path, json={**body, "stream": True, "stream_options": options})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "stream_options" and error["message"].startswith(f"stream_options.{field}:"), error


def test_one_stream_options_in_the_document(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    names = [name for name in doc["components"]["schemas"] if name.startswith("StreamOptions")]
    assert names == ["StreamOptions"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        request = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
        options = {o.get("$ref") for o in request["properties"]["stream_options"]["anyOf"]}
        assert "#/components/schemas/StreamOptions" in options
    assert set(doc["components"]["schemas"]["StreamOptions"]["properties"]) == {"include_usage", "continuous_usage_stats"}


def stream_events(client: httpx.Client, path: str, body: dict) -> list[dict]:
    import json

    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]
