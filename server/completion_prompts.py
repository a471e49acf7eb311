"""The prompts of a /v1/completions request, as the engine runs them and as the client sent them, and
their OpenAI logprobs (echo and completion).

BOS and echo: a prompt given as text gets the server's BOS in front; that BOS is context only and has
no logprob entry. A prompt given as token ids gets one logprob entry per id the client sent: when the
ids start with BOS, the server adds no second one and the BOS entry has logprob null (like OpenAI's
first token); otherwise BOS is prepended as context. `max_model_len` (= context - 1) counts only what
the client sends and what is generated, so max_model_len - 1 sent ids + 1 new token always fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.engine.requests import LogprobEntry, ScoreResult
from server.errors import invalid
from server.openai_schemas import CompletionLogprobs, CompletionRequest
from server.service import Service, off_loop


@dataclass
class Prompt:
    """One prompt as the engine sees it (`ids`, BOS first) and as the client sent it."""

    ids: list[int]
    text: str  # the echo text: what the client's tokens decode to
    offsets: list[int]  # character offset in `text` of each echoed token
    echoed: int  # how many of ids are echoed (the client's tokens): len(ids) or len(ids) - 1

    @property
    def skip(self) -> int:
        """Leading ids with no echo entry (the server's own BOS)."""
        return len(self.ids) - self.echoed


def parse_prompts(svc: Service, body: CompletionRequest) -> list[tuple[list[int] | None, str | None]]:
    """Normalise `prompt` to (token ids or None, text or None) pairs."""
    prompt = body.prompt
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and isinstance(prompt[0], int):  # the schema allows ids only after an id
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise invalid("prompt", "must not be an empty list")
    limit = svc.settings.max_prompts
    if len(items) > limit:
        raise invalid("prompt", f"at most {limit} prompts per request, got {len(items)}", code="too_many_prompts")
    return [_item(svc, item, "prompt" if len(items) == 1 else f"prompt[{i}]") for i, item in enumerate(items)]


def _item(svc: Service, item: str | list[int], where: str) -> tuple[list[int] | None, str | None]:
    if isinstance(item, str):
        if not item:
            raise invalid("prompt", f"{where} must not be empty")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid("prompt", f"{where} is not valid Unicode text (unpaired surrogate)") from None
        return None, item
    if not item:
        raise invalid("prompt", f"{where} must not be an empty token list")
    if len(item) > svc.context:  # before any per-token work (the echo offsets below cost O(n^2))
        raise invalid("prompt", f"{where} is {len(item)} tokens; the context holds {svc.context}",
                      code="context_length_exceeded")
    vocab = svc.config.vocab_size
    bad = [t for t in item if not 0 <= t < vocab]
    if bad:
        raise invalid("prompt", f"{where} has token ids outside [0, {vocab}): {bad[:5]}")
    return list(item), None


async def encode_prompts(svc: Service, items: list[tuple[list[int] | None, str | None]]) -> list[Prompt]:
    """Token ids for the engine (BOS first) plus the echo view of what the client sent."""
    texts = [t for _, t in items if t is not None]
    encoded = iter(await svc.prompt_ids(texts, offsets=True)) if texts else iter(())
    prompts: list[Prompt] = []
    for ids, text in items:
        if text is not None:
            enc = next(encoded)
            assert enc.offsets is not None
            prompts.append(Prompt(enc.ids, text, [start for start, _ in enc.offsets[1:]], len(enc.ids) - 1))
        else:
            sent = list(ids or [])
            # a decode per prefix: off the event loop when long
            prompts.append(await off_loop(len(sent) ** 2 // 2, lambda sent=sent: id_prompt(svc, sent)))
    return prompts


def id_prompt(svc: Service, sent: list[int]) -> Prompt:
    """A token-id prompt with its text and each token's character offset (a decode per prefix not shared with a
    recent prompt: O(n^2) in the new ids)."""
    full = sent if sent[0] == svc.bos else [svc.bos, *sent]
    text = svc.tokenizer.decode(sent, skip_special_tokens=False)
    offsets = svc.id_offsets.offsets(sent)  # from recent prompts' offsets where they start alike
    return Prompt(full, text, offsets, len(sent))


class Logprobs:
    """OpenAI completions logprobs (tokens, token_logprobs, top_logprobs, text_offset) of one request's prompts."""

    def __init__(self, svc: Service, prompts: list[Prompt]) -> None:
        self.svc = svc
        self.prompts = prompts

    def prompt(self, p: int, entries: list[LogprobEntry] | None) -> dict[str, list]:
        """One entry per token the client sent; entries[k] scores ids[k + 1], so a client's BOS gets null."""
        pr = self.prompts[p]
        lp = empty()
        for e, tok in enumerate(pr.ids[pr.skip:]):
            k = pr.skip + e - 1
            entry = entries[k] if entries and k >= 0 else None
            lp["tokens"].append(self.svc.token_str(tok))
            lp["token_logprobs"].append(entry.logprob if entry else None)
            lp["top_logprobs"].append(self._top(entry) if entry else None)
            lp["text_offset"].append(pr.offsets[e])
        return lp

    def completion(self, entries: list[LogprobEntry], base: int, offsets: list[int]) -> dict[str, list]:
        """Generated tokens' entries; `offsets` within their text, which starts at `base` in the choice's text."""
        return {"tokens": [self.svc.token_str(e.id) for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [self._top(e) for e in entries],
                "text_offset": [base + off for off in offsets]}

    def scored(self, score: ScoreResult, p: int) -> list[LogprobEntry]:
        """Prompt p's entries from a scoring job (max_tokens 0)."""
        return [LogprobEntry(t, lp, score.top[p][k] if score.top else None)
                for k, (t, lp) in enumerate(zip(self.prompts[p].ids[1:], score.logprobs[p]))]

    def offsets(self, token_ids: list[int]) -> list[int]:
        """Character offset of each generated token within the completion text."""
        decode = self.svc.tokenizer.decode
        return [len(decode(token_ids[:k], skip_special_tokens=True)) for k in range(len(token_ids))]

    def _top(self, entry: LogprobEntry) -> dict[str, float]:
        return {self.svc.token_str(t): lp for t, lp in (entry.top or {}).items()}


def empty() -> dict[str, list]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def merged(*parts: dict[str, list]) -> CompletionLogprobs:
    """One choice's logprobs from its parts in order (echoed prompt, then completion)."""
    out = empty()
    for part in parts:
        for key, values in part.items():
            out[key].extend(values)
    return CompletionLogprobs(**out)
