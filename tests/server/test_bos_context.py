"""BOS and the advertised context: echo logprobs give one entry per prompt token sent; max_model_len is usable."""

from __future__ import annotations

import httpx
import openai
import pytest

TEXT = "The cat sat on the mat in the old house."


def text_ids(client: httpx.Client, text: str) -> list[int]:
    return client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_gives_one_entry_per_sent_token(client: httpx.Client, oai: openai.OpenAI, max_tokens: int) -> None:
    ids = text_ids(client, TEXT)
    bos = client.get("/tokenizer_info").json()["bos_token_id"]
    ppl = client.post("/v1/perplexity", json={"text": TEXT, "return_logprobs": True}).json()["results"][0]
    expected = [e["logprob"] for e in ppl["logprobs"]]
    # without BOS: the server prepends it as context; one entry per sent id, each with a logprob
    plain = oai.completions.create(model="chiar-tiny", prompt=ids, max_tokens=max_tokens, echo=True, logprobs=1, temperature=0)
    lp = plain.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + max_tokens
    assert lp.token_logprobs[: len(ids)] == pytest.approx(expected, abs=1e-5)
    # with BOS sent: no second BOS, one entry more, the BOS entry is null (nothing predicts it)
    with_bos = oai.completions.create(model="chiar-tiny", prompt=[bos, *ids], max_tokens=max_tokens, echo=True, logprobs=1,
                                      temperature=0)
    lp = with_bos.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 + max_tokens
    assert lp.tokens[0] == "<bos>" and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1: len(ids) + 1] == pytest.approx(expected, abs=1e-5)
    assert with_bos.usage.prompt_tokens == plain.usage.prompt_tokens == len(ids) + 1  # BOS counted once, either way
    assert with_bos.choices[0].text == "<bos>" + plain.choices[0].text
    if max_tokens:
        assert lp.token_logprobs[-1] == pytest.approx(plain.choices[0].logprobs.token_logprobs[-1], abs=1e-5)


def test_echo_of_bos_alone_has_nothing_to_score(client: httpx.Client, oai: openai.OpenAI) -> None:
    """A prompt of BOS alone: no target to score (no window at all), answered at once with one null entry."""
    bos = client.get("/tokenizer_info").json()["bos_token_id"]
    out = oai.completions.create(model="chiar-tiny", prompt=[bos], max_tokens=0, echo=True, logprobs=1, timeout=30)
    lp = out.choices[0].logprobs
    assert lp.tokens == ["<bos>"] and lp.token_logprobs == [None] and out.usage.prompt_tokens == 1
    assert client.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 1}).status_code == 200  # engine unharmed


def test_streamed_echo_matches(client: httpx.Client, oai: openai.OpenAI) -> None:
    ids = text_ids(client, TEXT)
    full = oai.completions.create(model="chiar-tiny", prompt=[1, *ids], max_tokens=2, echo=True, logprobs=0, temperature=0)
    chunks = list(oai.completions.create(model="chiar-tiny", prompt=[1, *ids], max_tokens=2, echo=True, logprobs=0,
                                         temperature=0, stream=True))
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None
    assert streamed[1:] == pytest.approx(full.choices[0].logprobs.token_logprobs[1:], abs=1e-5)


def test_advertised_context_is_usable(client: httpx.Client, oai: openai.OpenAI) -> None:
    card = oai.models.retrieve("chiar-tiny")
    max_model_len = card.model_extra["max_model_len"]
    assert client.get("/tokenizer_info").json()["model_max_length"] == max_model_len
    assert client.post("/tokenize", json={"prompt": "x"}).json()["max_model_len"] == max_model_len
    filler = (text_ids(client, " ".join([TEXT] * 40)))[: max_model_len - 1]
    assert len(filler) == max_model_len - 1
    # max_model_len - 1 ids + 1 new token: with or without a leading BOS
    for prompt in (filler, [1, *filler]):
        done = oai.completions.create(model="chiar-tiny", prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
        assert done.usage.completion_tokens == 1
        assert len(done.choices[0].logprobs.token_logprobs) == len(prompt) + 1
    text = client.post("/detokenize", json={"tokens": filler}).json()["prompt"]
    assert oai.completions.create(model="chiar-tiny", prompt=text, max_tokens=1).usage.completion_tokens == 1
    # one more token is refused with a 400 that names the field
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model="chiar-tiny", prompt=[*filler, filler[0]], max_tokens=2)
    assert err.value.body["code"] == "context_length_exceeded"
