"""OpenAI-compatible /v1/completions, /v1/models and /v1/models/{id}.

BOS and echo: a prompt given as text gets the server's BOS in front; that BOS is context only and has
no logprob entry. A prompt given as token ids gets one logprob entry per id the client sent: when the
ids start with BOS, the server adds no second one and the BOS entry has logprob null (like OpenAI's
first token); otherwise BOS is prepended as context. `max_model_len` (= context - 1) counts only what
the client sends and what is generated, so max_model_len - 1 sent ids + 1 new token always fit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request

from server.engine import (
    DoneEvent,
    GenerateJob,
    GenerationResult,
    GenParams,
    Job,
    LogprobEntry,
    PromptEvent,
    ScoreJob,
    ScoreResult,
    TokenEvent,
)
from server.errors import invalid
from server.schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)
from server.service import ServedModels, Service, off_loop, sse
from server.stream_usage import StreamUsage

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid input (the error names the field)"},
    401: {"description": "missing or wrong API key"},
    413: {"description": "body too large"},
    503: {"description": "queue full or not ready (see Retry-After)"},
}


def register(app: FastAPI, served: ServedModels) -> None:
    """Add the OpenAI completions and model routes to `app`."""

    @app.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def models() -> ModelList:
        """Every served model, the default (the first --checkpoint) first."""
        return ModelList(data=[model_card(svc) for svc in served])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["openai"],
             responses={404: {"description": "no such model"}})
    async def model(model_id: str) -> ModelCard:
        return model_card(served.get(model_id))

    @app.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=False, responses=ERRORS,
              tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await openai_completions(served.get(body.model, request), body, request)


def model_card(svc: Service) -> ModelCard:
    return ModelCard(id=svc.name, created=svc.created, max_model_len=svc.max_model_len, arch=svc.config.arch)


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


def _prompts(svc: Service, body: CompletionRequest) -> list[tuple[list[int] | None, str | None]]:
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
    if len(items) > svc.settings.max_prompts:
        raise invalid("prompt", f"at most {svc.settings.max_prompts} prompts per request, got {len(items)}", code="too_many_prompts")
    out: list[tuple[list[int] | None, str | None]] = []
    vocab = svc.config.vocab_size
    for i, item in enumerate(items):
        where = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            if not item:
                raise invalid("prompt", f"{where} must not be empty")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise invalid("prompt", f"{where} is not valid Unicode text (unpaired surrogate)") from None
            out.append((None, item))
        else:
            if not item:
                raise invalid("prompt", f"{where} must not be an empty token list")
            if len(item) > svc.context:  # before any per-token work (the echo offsets below cost O(n^2))
                raise invalid("prompt", f"{where} is {len(item)} tokens; the context holds {svc.context}",
                              code="context_length_exceeded")
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise invalid("prompt", f"{where} has token ids outside [0, {vocab}): {bad[:5]}")
            out.append((list(item), None))
    return out


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
            prompts.append(await off_loop(len(sent) ** 2 // 2, lambda sent=sent: id_prompt(svc, sent)))  # a decode per prefix
    return prompts


def id_prompt(svc: Service, sent: list[int]) -> Prompt:
    """A token-id prompt with its text and each token's character offset (a decode per prefix not shared with a
    recent prompt: O(n^2) in the new ids)."""
    full = sent if sent[0] == svc.bos else [svc.bos, *sent]
    text = svc.tokenizer.decode(sent, skip_special_tokens=False)
    offsets = svc.id_offsets.offsets(sent)  # from recent prompts' offsets where they start alike
    return Prompt(full, text, offsets, len(sent))


async def openai_completions(svc: Service, body: CompletionRequest, request: Request) -> Any:
    prompts = await encode_prompts(svc, _prompts(svc, body))
    # absent: OpenAI's 16; null: the rest of the context; either capped at max_new_tokens and what each prompt leaves
    sent = body.max_tokens if "max_tokens" in body.model_fields_set else None
    default = 16 if "max_tokens" not in body.model_fields_set else svc.context
    new_per_prompt = [svc.new_tokens(sent, default, "max_tokens", pr.ids) for pr in prompts]
    for pr, new in zip(prompts, new_per_prompt):
        svc.check_length(pr.ids, new, "max_tokens")
    rid = "cmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    want_prompt_lp = body.echo and body.logprobs is not None
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    jobs: list[Job] = []
    if sent == 0:
        if want_prompt_lp:
            svc.check_score_kv([pr.ids for pr in prompts], "prompt")
            jobs.append(ScoreJob([pr.ids for pr in prompts], svc.context, svc.context, body.logprobs, queue=queue, loop=loop,
                                 index=0, timeout=svc.settings.request_timeout))
    else:
        for i, pr in enumerate(prompts):
            for j in range(body.n):
                params = GenParams(max_new_tokens=new_per_prompt[i],
                                   temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                   seed=None if body.seed is None else body.seed + j, stop=body.stop, ignore_eos=body.ignore_eos,
                                   logprobs=body.logprobs, prompt_logprobs=body.logprobs if want_prompt_lp else None)
                jobs.append(GenerateJob(pr.ids, params, queue=queue, loop=loop, index=i * body.n + j,
                                        timeout=svc.settings.request_timeout))
    if jobs:
        svc.submit(jobs)
    n_choices = len(prompts) * body.n
    prompt_tokens = sum(len(pr.ids) for pr in prompts)

    def prompt_lp(i: int, entries: list[LogprobEntry] | None) -> dict[str, list]:
        """One entry per token the client sent; entries[k] scores ids[k + 1], so a client's BOS gets null."""
        pr = prompts[i]
        lp: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e, tok in enumerate(pr.ids[pr.skip:]):
            k = pr.skip + e - 1
            entry = entries[k] if entries and k >= 0 else None
            lp["tokens"].append(svc.engine.token_str(tok))
            lp["token_logprobs"].append(entry.logprob if entry else None)
            lp["top_logprobs"].append(_top(svc, entry) if entry else None)
            lp["text_offset"].append(pr.offsets[e])
        return lp

    def completion_lp(entries: list[LogprobEntry], base: int, texts_before: list[int]) -> dict[str, list]:
        return {"tokens": [svc.engine.token_str(e.id) for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [_top(svc, e) for e in entries],
                "text_offset": [base + off for off in texts_before]}

    def scored_entries(score: ScoreResult, p: int) -> list[LogprobEntry]:
        return [LogprobEntry(t, lp, score.top[p][k] if score.top else None)
                for k, (t, lp) in enumerate(zip(prompts[p].ids[1:], score.logprobs[p]))]

    def choice(index: int, result: GenerationResult | None, echo_entries: list[LogprobEntry] | None) -> CompletionChoice:
        p = index // body.n
        ptext = prompts[p].text
        text = result.text if result else ""
        lp = None
        if body.logprobs is not None:
            merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            if body.echo:
                _extend(merged, prompt_lp(p, echo_entries))
            if result and result.token_logprobs:
                base = len(ptext) if body.echo else 0
                _extend(merged, completion_lp(result.token_logprobs, base, _offsets(svc, result.token_ids)))
            lp = CompletionLogprobs(**merged)
        finish = "length" if result is None or result.finish_reason == "length" else "stop"
        return CompletionChoice(index=index, text=(ptext if body.echo else "") + text, logprobs=lp, finish_reason=finish)

    if not body.stream:
        results: list[GenerationResult | None] = [None] * n_choices
        echoes: list[list[LogprobEntry] | None] = [None] * n_choices
        if jobs and isinstance(jobs[0], ScoreJob):
            score: ScoreResult = (await svc.collect(jobs, queue, request))[0]
            for i in range(n_choices):
                echoes[i] = scored_entries(score, i // body.n)
        elif jobs:
            for r, job in zip(await svc.collect(jobs, queue, request), jobs):
                results[job.index] = r
                echoes[job.index] = r.prompt_logprobs
        completion_tokens = sum(r.completion_tokens for r in results if r)
        # each prompt once, as prompt_tokens counts it: its first choice's cached tokens
        cached = sum(score.cached_tokens or []) if jobs and isinstance(jobs[0], ScoreJob) else \
            sum(r.cached_tokens for i, r in enumerate(results) if r and i % body.n == 0)
        return CompletionResponse(id=rid, created=created, model=svc.name,
                                  choices=[choice(i, results[i], echoes[i]) for i in range(n_choices)],
                                  usage=Usage.of(prompt_tokens, completion_tokens, cached))

    usage = StreamUsage.of(body.stream_options, [len(prompts[i // body.n].ids) for i in range(n_choices)], prompt_tokens)

    def chunk(index: int, text: str, finish: str | None, lp: dict[str, list] | None = None) -> bytes:
        data: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": svc.name,
                                "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]}
        if usage.include:
            data["usage"] = usage.of_choice(index)
        return sse(data)

    async def stream() -> AsyncIterator[bytes]:
        if not jobs or isinstance(jobs[0], ScoreJob):  # max_tokens == 0: the echo is the whole answer
            score: ScoreResult | None = None
            if jobs:
                async for event in svc.events(jobs, queue, None):
                    if isinstance(event, DoneEvent):
                        score = event.result  # type: ignore[assignment]
                        usage.finished(0, 0, sum(score.cached_tokens or []))  # type: ignore[union-attr]
            for i in range(n_choices):
                p = i // body.n
                entries = scored_entries(score, p) if score is not None else None
                lp = prompt_lp(p, entries) if body.logprobs is not None and body.echo else None
                yield chunk(i, prompts[p].text if body.echo else "", "length", lp)
        else:
            sent_echo: set[int] = set()
            emitted = [0] * n_choices
            for i in range(n_choices):
                if body.echo and not want_prompt_lp:
                    sent_echo.add(i)
                    yield chunk(i, prompts[i // body.n].text, None)
            async for event in svc.events(jobs, queue, None):
                i = event.index
                if isinstance(event, PromptEvent) and i not in sent_echo:
                    sent_echo.add(i)
                    yield chunk(i, prompts[i // body.n].text, None, prompt_lp(i // body.n, event.logprobs))
                elif isinstance(event, TokenEvent):
                    usage.generated(i, len(event.token_ids))
                    lp = None
                    if body.logprobs is not None and event.logprobs is not None:
                        base = (len(prompts[i // body.n].text) if body.echo else 0) + emitted[i]
                        lp = completion_lp(event.logprobs, base, [0] * len(event.logprobs))
                    emitted[i] += len(event.text)
                    if event.text or lp:
                        yield chunk(i, event.text, None, lp)
                elif isinstance(event, DoneEvent):
                    result: GenerationResult = event.result  # type: ignore[assignment]
                    usage.finished(i, result.completion_tokens, result.cached_tokens if i % body.n == 0 else 0)
                    yield chunk(i, "", "length" if result.finish_reason == "length" else "stop")
        if usage.include:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": svc.name, "choices": [],
                       "usage": usage.totals()})

    return svc.sse_response(stream(), request)


def _extend(into: dict[str, list], part: dict[str, list]) -> None:
    for key, values in part.items():
        into[key].extend(values)


def _top(svc: Service, entry: LogprobEntry) -> dict[str, float]:
    return {svc.engine.token_str(t): lp for t, lp in (entry.top or {}).items()}


def _offsets(svc: Service, token_ids: list[int]) -> list[int]:
    """Character offset of each generated token within the completion text."""
    return [len(svc.tokenizer.decode(token_ids[:k], skip_special_tokens=True)) for k in range(len(token_ids))]
