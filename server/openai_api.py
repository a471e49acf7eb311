"""OpenAI-compatible /v1/completions, /v1/models and /v1/models/{id}.

A completions request is served by `CompletionServing`: request -> jobs, then the response or the
stream. Its prompts (text or token ids, BOS and echo) and logprobs are server/completion_prompts.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request

from server import routes
from server.completion_prompts import Logprobs, Prompt, encode_prompts, merged, parse_prompts
from server.engine.requests import (
    DoneEvent,
    GenerationResult,
    GenParams,
    LogprobEntry,
    PromptEvent,
    ScoreJob,
    ScoreResult,
    TokenEvent,
)
from server.errors import ERRORS
from server.openai_schemas import CompletionChoice, CompletionRequest, CompletionResponse, ModelCard, ModelList
from server.openai_serving import OpenAIServing, finish_reason
from server.sampling_params import engine_sampling
from server.schemas import Usage
from server.service import ServedModels, Service


def register(app: FastAPI, served: ServedModels) -> None:
    """Add the OpenAI completions and model routes to `app`."""

    @app.get(routes.MODELS.path, response_model=ModelList, tags=["openai"])
    async def models() -> ModelList:
        """Every served model, the default (the first --checkpoint) first."""
        return ModelList(data=[model_card(svc) for svc in served])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["openai"],
             responses={404: {"description": "no such model"}})
    async def model(model_id: str) -> ModelCard:
        return model_card(served.get(model_id))

    @app.post(routes.COMPLETIONS.path, response_model=CompletionResponse, response_model_exclude_none=False,
              responses=ERRORS, tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        svc = served.get(body.model, request)
        serving = await CompletionServing.start(svc, body)
        return await serving.response(request) if not body.stream else svc.sse_response(serving.stream(), request)


def model_card(svc: Service) -> ModelCard:
    return ModelCard(id=svc.name, created=svc.created, max_model_len=svc.max_model_len, arch=svc.config.arch)


class CompletionServing(OpenAIServing):
    """One /v1/completions request: its prompts, its jobs (generate jobs, or one scoring job for max_tokens 0
    with echoed logprobs), then its response or its stream of chunks."""

    id_prefix = "cmpl-"
    chunk_object = "text_completion"

    def __init__(self, svc: Service, body: CompletionRequest, prompts: list[Prompt]) -> None:
        super().__init__(svc, body.stream_options, [len(prompts[i // body.n].ids) for i in range(len(prompts) * body.n)],
                         sum(len(pr.ids) for pr in prompts))
        self.body = body
        self.prompts = prompts
        self.logprobs = Logprobs(svc, prompts)
        self.prompt_lp = body.echo and body.logprobs is not None  # logprobs of the echoed prompt wanted

    @classmethod
    async def start(cls, svc: Service, body: CompletionRequest) -> CompletionServing:
        """Check and encode the request, make its jobs and submit them."""
        serving = cls(svc, body, await encode_prompts(svc, parse_prompts(svc, body)))
        serving.make_jobs()
        if serving.jobs:
            svc.submit(serving.jobs, stream=body.stream)
        return serving

    # ---------------------------------------------------------------- request -> jobs
    def make_jobs(self) -> None:
        body, svc = self.body, self.svc
        # absent: OpenAI's 16; null: the rest of the context; either capped at max_new_tokens and what each prompt leaves
        sent = body.max_tokens if "max_tokens" in body.model_fields_set else None
        default = 16 if "max_tokens" not in body.model_fields_set else svc.context
        new_per_prompt = [svc.new_tokens(sent, default, "max_tokens", pr.ids) for pr in self.prompts]
        for pr, new in zip(self.prompts, new_per_prompt):
            svc.check_length(pr.ids, new, "max_tokens")
        if sent == 0:
            if self.prompt_lp:
                svc.check_score_kv([pr.ids for pr in self.prompts], "prompt")
                self.jobs.score([pr.ids for pr in self.prompts], svc.context, svc.context, body.logprobs)
            return
        sampling = asdict(engine_sampling(body.temperature, body.top_p, body.top_k))
        for pr, new in zip(self.prompts, new_per_prompt):
            for j in range(body.n):
                self.jobs.generate(pr.ids, GenParams(
                    max_new_tokens=new, **sampling, seed=None if body.seed is None else body.seed + j, stop=body.stop,
                    ignore_eos=body.ignore_eos, logprobs=body.logprobs,
                    prompt_logprobs=body.logprobs if self.prompt_lp else None))

    @property
    def scoring(self) -> bool:
        """No generation: max_tokens 0 (the echo, scored or not, is the whole answer)."""
        return not self.jobs or isinstance(self.jobs.items[0], ScoreJob)

    def _echo_text(self, index: int) -> str:
        return self.prompts[index // self.body.n].text if self.body.echo else ""

    # ---------------------------------------------------------------- response
    def choice(self, index: int, result: GenerationResult | None, echo: list[LogprobEntry] | None) -> CompletionChoice:
        p = index // self.body.n
        lp = None
        if self.body.logprobs is not None:
            parts = [self.logprobs.prompt(p, echo)] if self.body.echo else []
            if result and result.token_logprobs:
                base = len(self.prompts[p].text) if self.body.echo else 0
                parts.append(self.logprobs.completion(result.token_logprobs, base, self.logprobs.offsets(result.token_ids)))
            lp = merged(*parts)
        text = self._echo_text(index) + (result.text if result else "")
        return CompletionChoice(index=index, text=text, logprobs=lp,
                                finish_reason=finish_reason(result.finish_reason if result else None))

    async def response(self, request: Request) -> CompletionResponse:
        results: list[GenerationResult | None] = [None] * self.n_choices
        echoes: list[list[LogprobEntry] | None] = [None] * self.n_choices
        if self.jobs and self.scoring:
            score: ScoreResult = (await self.svc.collect(self.jobs, request))[0]
            echoes = [self.logprobs.scored(score, i // self.body.n) for i in range(self.n_choices)]
        elif self.jobs:
            results = await self.svc.collect(self.jobs, request)
            echoes = [r.prompt_logprobs for r in results]  # type: ignore[union-attr]
        completion_tokens = sum(r.completion_tokens for r in results if r)
        # each prompt once, as prompt_tokens counts it: its first choice's cached tokens
        cached = sum(score.cached_tokens or []) if self.jobs and self.scoring else \
            sum(r.cached_tokens for i, r in enumerate(results) if r and i % self.body.n == 0)
        return CompletionResponse(id=self.rid, created=self.created, model=self.svc.name,
                                  choices=[self.choice(i, results[i], echoes[i]) for i in range(self.n_choices)],
                                  usage=Usage.of(self.prompt_tokens, completion_tokens, cached))

    # ---------------------------------------------------------------- stream
    def choice_chunk(self, index: int, text: str, finish: str | None, lp: dict[str, list] | None = None) -> bytes:
        return self.chunk([{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}],
                          self.usage.of_choice(index))

    async def stream(self) -> AsyncIterator[bytes]:
        chunks = self._scored_chunks() if self.scoring else self._generated_chunks()
        async for chunk in chunks:
            yield chunk
        if self.usage.include:
            yield self.usage_chunk()

    async def _scored_chunks(self) -> AsyncIterator[bytes]:
        """max_tokens 0: one chunk per choice with the echo (and its logprobs, from the scoring job)."""
        score: ScoreResult | None = None
        if self.jobs:
            async for event in self.svc.events(self.jobs):
                if isinstance(event, DoneEvent):
                    score = event.result  # type: ignore[assignment]
                    self.usage.finished(0, 0, sum(score.cached_tokens or []))  # type: ignore[union-attr]
        for i in range(self.n_choices):
            p = i // self.body.n
            lp = None
            if self.prompt_lp:
                lp = self.logprobs.prompt(p, self.logprobs.scored(score, p) if score is not None else None)
            yield self.choice_chunk(i, self._echo_text(i), "length", lp)

    async def _generated_chunks(self) -> AsyncIterator[bytes]:
        body = self.body
        echoed: set[int] = set()
        emitted = [0] * self.n_choices  # characters streamed per choice (completion logprob offsets)
        if body.echo and not self.prompt_lp:  # the echo goes first; with its logprobs, once the engine has them
            for i in range(self.n_choices):
                echoed.add(i)
                yield self.choice_chunk(i, self._echo_text(i), None)
        async for event in self.svc.events(self.jobs):
            i = event.index
            if isinstance(event, PromptEvent) and i not in echoed:
                echoed.add(i)
                yield self.choice_chunk(i, self.prompts[i // body.n].text, None,
                                        self.logprobs.prompt(i // body.n, event.logprobs))
            elif isinstance(event, TokenEvent):
                self.usage.generated(i, len(event.token_ids))
                lp = None
                if body.logprobs is not None and event.logprobs is not None:
                    base = len(self._echo_text(i)) + emitted[i]
                    lp = self.logprobs.completion(event.logprobs, base, [0] * len(event.logprobs))
                emitted[i] += len(event.text)
                if event.text or lp:
                    yield self.choice_chunk(i, event.text, None, lp)
            elif isinstance(event, DoneEvent):
                result: GenerationResult = event.result  # type: ignore[assignment]
                self.usage.finished(i, result.completion_tokens, result.cached_tokens if i % body.n == 0 else 0)
                yield self.choice_chunk(i, "", finish_reason(result.finish_reason))
