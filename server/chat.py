"""OpenAI-compatible /v1/chat/completions: messages -> chat template -> ids -> generate jobs.

The template is the checkpoint's `chat_template` (tokenizer_config.json, rendered with Jinja in a
sandbox as Hugging Face does), else the plain default of model.hf_tokenizer, with which generation
also stops at "\\nUser:". The rendered prompt is tokenized like any prompt text (the server adds BOS;
a leading `{{ bos_token }}` from the template is dropped rather than doubled).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.hf_tokenizer import DEFAULT_CHAT_STOP, DEFAULT_CHAT_TEMPLATE, chat_template
from server import routes
from server.engine.requests import DoneEvent, GenParams, LogprobEntry, TokenEvent
from server.errors import ERRORS, invalid
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
from server.openai_serving import OpenAIServing, finish_reason
from server.sampling_params import engine_sampling
from server.schemas import Usage
from server.service import ServedModels, Service
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

    @app.post(routes.CHAT.path, response_model=ChatCompletionResponse, tags=["openai"], responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        svc = served.get(body.model, request)
        serving = await ChatServing.start(svc, template[svc.name], body)
        return await serving.response(request) if not body.stream else svc.sse_response(serving.stream(), request)


def _bytes(token: str) -> list[int]:
    if token.startswith("bytes:"):
        return [int(h, 16) for h in token[len("bytes:"):].split("\\x") if h]
    return list(token.encode("utf-8"))


def chat_logprobs(svc: Service, entries: list[LogprobEntry]) -> ChatLogprobs:
    content = []
    for e in entries:
        token = svc.token_str(e.id)
        tops = [TopLogprob(token=(t := svc.token_str(tid)), logprob=lp, bytes=_bytes(t)) for tid, lp in (e.top or {}).items()]
        content.append(ChatTokenLogprob(token=token, logprob=e.logprob, bytes=_bytes(token), top_logprobs=tops))
    return ChatLogprobs(content=content)


class ChatServing(OpenAIServing):
    """One /v1/chat/completions request: the rendered conversation, `n` generate jobs, then the response or
    the stream of chunks."""

    id_prefix = "chatcmpl-"
    chunk_object = "chat.completion.chunk"

    def __init__(self, svc: Service, body: ChatCompletionRequest, ids: list[int]) -> None:
        super().__init__(svc, body.stream_options, [len(ids)] * body.n, len(ids))
        self.body = body
        self.ids = ids

    @classmethod
    async def start(cls, svc: Service, template: ChatTemplate, body: ChatCompletionRequest) -> ChatServing:
        """Render and encode the conversation (off the event loop), make the jobs and submit them."""
        ids = await asyncio.get_running_loop().run_in_executor(POOL, template.encode, svc, body.messages)
        serving = cls(svc, body, ids)
        serving.make_jobs(template.stop)
        svc.submit(serving.jobs, stream=body.stream)
        return serving

    # ---------------------------------------------------------------- request -> jobs
    def make_jobs(self, template_stop: list[str]) -> None:
        body, svc, ids = self.body, self.svc, self.ids
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if body.max_completion_tokens is not None and body.max_tokens is not None:  # both within the limit, though one wins
            svc.new_tokens(body.max_tokens, svc.context, "max_tokens", ids)
        new_tokens = svc.new_tokens(body.new_tokens, svc.context, param, ids)
        svc.check_length(ids, new_tokens, param, prompt_param="messages")
        top_n = (body.top_logprobs or 0) if body.logprobs else None
        sampling = asdict(engine_sampling(body.temperature, body.top_p, body.top_k))
        for j in range(body.n):
            self.jobs.generate(ids, GenParams(
                max_new_tokens=new_tokens, **sampling, seed=None if body.seed is None else body.seed + j,
                stop=[*(body.stop or []), *template_stop], logprobs=top_n, ignore_eos=body.ignore_eos))

    # ---------------------------------------------------------------- response
    async def response(self, request: Request) -> ChatCompletionResponse:
        results = await self.svc.collect(self.jobs, request)
        choices = [ChatChoice(index=i, message=AssistantMessage(content=r.text), finish_reason=finish_reason(r.finish_reason),
                              logprobs=chat_logprobs(self.svc, r.token_logprobs or []) if self.body.logprobs else None)
                   for i, r in enumerate(results)]
        completion = sum(r.completion_tokens for r in results)
        return ChatCompletionResponse(id=self.rid, created=self.created, model=self.svc.name, choices=choices,
                                      usage=Usage.of(self.prompt_tokens, completion, results[0].cached_tokens))

    # ---------------------------------------------------------------- stream
    def delta_chunk(self, index: int, delta: dict[str, str], logprobs: Any = None, finish: str | None = None) -> bytes:
        return self.chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                          self.usage.of_choice(index))

    async def stream(self) -> AsyncIterator[bytes]:
        for j in range(self.n_choices):
            yield self.delta_chunk(j, {"role": "assistant", "content": ""})
        async for event in self.svc.events(self.jobs):
            j = event.index
            if isinstance(event, TokenEvent):
                self.usage.generated(j, len(event.token_ids))
                lp = chat_logprobs(self.svc, event.logprobs or []).model_dump() if self.body.logprobs else None
                if event.text or lp:
                    yield self.delta_chunk(j, {"content": event.text}, lp)
            elif isinstance(event, DoneEvent):
                self.usage.finished(j, event.result.completion_tokens,  # type: ignore[union-attr]
                                    event.result.cached_tokens if j == 0 else 0)  # type: ignore[union-attr]
                yield self.delta_chunk(j, {}, None, finish_reason(event.result.finish_reason))  # type: ignore[union-attr]
        if self.usage.include:
            yield self.usage_chunk()
