"""OpenAI-compatible /v1/chat/completions: messages -> chat template -> ids -> generate jobs.

The template is the checkpoint's `chat_template` (tokenizer_config.json, rendered with Jinja in a
sandbox as Hugging Face does), else the plain default of model.hf_tokenizer, with which generation
also stops at "\\nUser:". The rendered prompt is tokenized like any prompt text (the server adds BOS;
a leading `{{ bos_token }}` from the template is dropped rather than doubled).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.hf_tokenizer import DEFAULT_CHAT_STOP, DEFAULT_CHAT_TEMPLATE, chat_template
from server.engine import DoneEvent, GenerateJob, GenParams, Job, LogprobEntry, TokenEvent
from server.errors import invalid
from server.openai_api import ERRORS
from server.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    TopLogprob,
)
from server.schemas import Usage
from server.service import ServedModels, Service, sse
from server.stream_usage import StreamUsage
from server.token_limits import POOL


@dataclass
class ChatTemplate:
    """A compiled chat template and the stop strings that go with it."""

    source: str
    stop: list[str]
    bos_token: str
    eos_token: str

    @classmethod
    def for_service(cls, svc: Service) -> ChatTemplate:
        source = chat_template(svc.checkpoint)
        stop = list(DEFAULT_CHAT_STOP) if source == DEFAULT_CHAT_TEMPLATE else []
        return cls(source, stop, svc.tokenizer.id_to_token(svc.config.bos_token_id) or "",
                   svc.tokenizer.id_to_token(svc.config.eos_token_id) or "")

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            text = env.from_string(self.source).render(
                messages=[{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages],
                add_generation_prompt=add_generation_prompt, bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as exc:  # a template may raise_exception() on a bad conversation
            raise invalid("messages", f"the chat template rejected the conversation: {exc}", code="invalid_chat") from None
        return text.removeprefix(self.bos_token) if self.bos_token else text

    def encode(self, svc: Service, messages: list[ChatMessage], add_generation_prompt: bool = True, tokenize: bool = False) -> list[int]:
        """Ids the engine runs (BOS first), at most the context (`tokenize`: at most --max-score-tokens)."""
        text = self.render(messages, add_generation_prompt)
        if tokenize:
            return svc.scored_ids_now([text], "messages", "tokenize")[0].ids
        return svc.prompt_ids_now([text], "messages")[0].ids


def templates(served: ServedModels) -> dict[str, ChatTemplate]:
    """Each served model's chat template, by model id."""
    return {svc.name: ChatTemplate.for_service(svc) for svc in served}


def register(app: FastAPI, served: ServedModels) -> None:
    """Add /v1/chat/completions to `app`."""
    template = templates(served)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["openai"], responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        svc = served.get(body.model, request)
        return await run_chat(svc, template[svc.name], body, request)


def _bytes(token: str) -> list[int]:
    if token.startswith("bytes:"):
        return [int(h, 16) for h in token[len("bytes:"):].split("\\x") if h]
    return list(token.encode("utf-8"))


def chat_logprobs(svc: Service, entries: list[LogprobEntry]) -> ChatLogprobs:
    content = []
    for e in entries:
        token = svc.engine.token_str(e.id)
        tops = [TopLogprob(token=(t := svc.engine.token_str(tid)), logprob=lp, bytes=_bytes(t)) for tid, lp in (e.top or {}).items()]
        content.append(ChatTokenLogprob(token=token, logprob=e.logprob, bytes=_bytes(token), top_logprobs=tops))
    return ChatLogprobs(content=content)


# Below these, float32 sampling overflows (logits / T) or rounds p to 0; both limits are exactly greedy
# decoding among the best token, so they are sent as such.
TINY = 1e-6


def sampling(body: ChatCompletionRequest) -> tuple[float, int | None, float | None]:
    """(temperature, top_k, top_p) for the engine, with the T -> 0 and p -> 0 limits made explicit."""
    temperature, top_k, top_p = body.temperature, body.top_k, body.top_p
    if temperature < TINY:
        return 0.0, None, None
    if top_p < TINY:
        return temperature, 1, None
    return temperature, top_k, top_p


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def run_chat(svc: Service, template: ChatTemplate, body: ChatCompletionRequest, request: Request) -> Any:
    ids = await asyncio.get_running_loop().run_in_executor(POOL, template.encode, svc, body.messages)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if body.max_completion_tokens is not None and body.max_tokens is not None:  # both within the limit, though one wins
        svc.new_tokens(body.max_tokens, svc.context, "max_tokens", ids)
    new_tokens = svc.new_tokens(body.new_tokens, svc.context, param, ids)
    svc.check_length(ids, new_tokens, param, prompt_param="messages")
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    jobs: list[Job] = []
    temperature, top_k, top_p = sampling(body)
    for j in range(body.n):
        params = GenParams(max_new_tokens=new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=None if body.seed is None else body.seed + j, stop=[*(body.stop or []), *template.stop],
                           logprobs=top_n, ignore_eos=body.ignore_eos)
        jobs.append(GenerateJob(ids, params, queue=queue, loop=loop, index=j, timeout=svc.settings.request_timeout))
    svc.submit(jobs)
    rid = "chatcmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    prompt_tokens = len(ids)

    if not body.stream:
        results = await svc.collect(jobs, queue, request)
        choices = [ChatChoice(index=i, message=AssistantMessage(content=r.text), finish_reason=_finish(r.finish_reason),
                              logprobs=chat_logprobs(svc, r.token_logprobs or []) if body.logprobs else None)
                   for i, r in enumerate(results)]
        completion = sum(r.completion_tokens for r in results)
        return ChatCompletionResponse(id=rid, created=created, model=svc.name, choices=choices,
                                      usage=Usage.of(prompt_tokens, completion, results[0].cached_tokens))

    usage = StreamUsage.of(body.stream_options, [prompt_tokens] * body.n, prompt_tokens)

    def chunk(choices: list[dict[str, Any]], counts: dict[str, int] | None = None) -> bytes:
        data: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": svc.name,
                                "choices": choices}
        if usage.include:
            data["usage"] = counts
        return sse(data)

    async def stream() -> AsyncIterator[bytes]:
        for j in range(body.n):
            yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
                        usage.of_choice(j))
        async for event in svc.events(jobs, queue, None):
            j = event.index
            if isinstance(event, TokenEvent):
                usage.generated(j, len(event.token_ids))
                lp = chat_logprobs(svc, event.logprobs or []).model_dump() if body.logprobs else None
                if event.text or lp:
                    yield chunk([{"index": j, "delta": {"content": event.text}, "logprobs": lp, "finish_reason": None}],
                                usage.of_choice(j))
            elif isinstance(event, DoneEvent):
                usage.finished(j, event.result.completion_tokens, event.result.cached_tokens if j == 0 else 0)  # type: ignore[union-attr]
                yield chunk([{"index": j, "delta": {}, "logprobs": None,
                              "finish_reason": _finish(event.result.finish_reason)}], usage.of_choice(j))  # type: ignore[union-attr]
        if usage.include:
            yield chunk([], usage.totals())

    return svc.sse_response(stream(), request)
