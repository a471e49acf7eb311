"""/v1/chat/completions and /v1/models/{id} through the real openai client against a real server process."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from model.hf_tokenizer import DEFAULT_CHAT_TEMPLATE

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about the city."}]
RENDERED = "You are terse.\n\nUser: Tell me about the city.\nAssistant:"


def test_chat_is_the_completion_of_the_rendered_template(oai: openai.OpenAI) -> None:
    chat = oai.chat.completions.create(model="chiar-tiny", messages=MESSAGES, max_completion_tokens=8, temperature=0)
    plain = oai.completions.create(model="chiar-tiny", prompt=RENDERED, max_tokens=8, temperature=0, stop=["\nUser:"])
    choice = chat.choices[0]
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert choice.message.content == plain.choices[0].text
    assert choice.finish_reason == plain.choices[0].finish_reason
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens
    assert chat.usage.completion_tokens == plain.usage.completion_tokens
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_chat_stream_equals_non_stream_with_usage(oai: openai.OpenAI) -> None:
    full = oai.chat.completions.create(model="chiar-tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(oai.chat.completions.create(model="chiar-tiny", messages=MESSAGES, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # without include_usage no chunk carries usage
    plain = list(oai.chat.completions.create(model="chiar-tiny", messages=MESSAGES, max_tokens=3, stream=True, seed=1))
    assert all(c.usage is None and c.choices for c in plain)


def test_chat_n_seed_and_length(oai: openai.OpenAI) -> None:
    a = oai.chat.completions.create(model="chiar-tiny", messages=MESSAGES, max_tokens=6, n=3, seed=5, temperature=1.0)
    b = oai.chat.completions.create(model="chiar-tiny", messages=MESSAGES, max_tokens=6, n=3, seed=5, temperature=1.0)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens <= 18
    assert all(c.finish_reason in ("stop", "length") for c in a.choices)


def test_chat_logprobs_and_top_logprobs(oai: openai.OpenAI) -> None:
    chat = oai.chat.completions.create(model="chiar-tiny", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-5)
        assert entry.bytes is not None
    assert math.fsum(math.exp(t.logprob) for t in content[0].top_logprobs) <= 1 + 1e-6
    no_top = oai.chat.completions.create(model="chiar-tiny", messages=MESSAGES, max_tokens=2, logprobs=True)
    assert all(e.top_logprobs == [] for e in no_top.choices[0].logprobs.content)
    assert oai.chat.completions.create(model="chiar-tiny", messages=MESSAGES, max_tokens=2).choices[0].logprobs is None


def test_chat_stop_cuts_text(oai: openai.OpenAI) -> None:
    full = oai.chat.completions.create(model="chiar-tiny", messages=MESSAGES, max_tokens=30, temperature=0).choices[0]
    text = full.message.content
    candidates = [text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2]]
    if not candidates:
        pytest.fail(f"greedy text too short to pick a stop string: {text!r}")
    cut = oai.chat.completions.create(model="chiar-tiny", messages=MESSAGES, max_tokens=30, temperature=0, stop=candidates[0])
    assert cut.choices[0].message.content == text[: text.index(candidates[0])]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_content_parts_and_errors(oai: openai.OpenAI, client: httpx.Client) -> None:
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
             {"role": "user", "content": [{"type": "text", "text": "Tell me about "}, {"type": "text", "text": "the city."}]}]
    a = oai.chat.completions.create(model="chiar-tiny", messages=parts, max_tokens=4, temperature=0)
    b = oai.chat.completions.create(model="chiar-tiny", messages=MESSAGES, max_tokens=4, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    cases = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": MESSAGES, "presence_penalty": 0.5}, "presence_penalty"),
        ({"messages": MESSAGES, "logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"messages": MESSAGES, "stream": 1}, "stream"),
        ({"messages": MESSAGES, "n": 1.5}, "n"),
        ({"messages": MESSAGES, "stop": ""}, "stop"),
        ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 6}, "top_logprobs"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "max_completion_tokens": 100000}, "max_completion_tokens"),
        ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"messages": MESSAGES, "n": True}, "n"),
        ({"messages": MESSAGES, "temperature": "1"}, "temperature"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ]
    for body, param in cases:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["message"].startswith(param), (body, error)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=1)
    # accepted consistently: max_completion_tokens wins over max_tokens; top_logprobs alone is ignored; 1.0 is an integer
    both = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 2,
                                                     "top_logprobs": 2, "n": 1.0, "temperature": 0}).json()
    assert both["usage"]["completion_tokens"] <= 2 and both["choices"][0]["logprobs"] is None


def test_models_retrieve(oai: openai.OpenAI, client: httpx.Client) -> None:
    card = oai.models.retrieve("chiar-tiny")
    assert card.id == "chiar-tiny" and card.object == "model"
    listed = client.get("/v1/models").json()["data"][0]
    assert client.get("/v1/models/chiar-tiny").json() == listed
    with pytest.raises(openai.NotFoundError) as err:
        oai.models.retrieve("gpt-4")
    assert err.value.body["code"] == "model_not_found"


def test_default_template_is_documented_plain_format() -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    text = ImmutableSandboxedEnvironment().from_string(DEFAULT_CHAT_TEMPLATE).render(messages=MESSAGES, add_generation_prompt=True)
    assert text == RENDERED
