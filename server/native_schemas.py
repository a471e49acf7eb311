"""Request and response models of the native protocol: /v1/generate, /v1/perplexity (and its raw-text
form) and /v1/tokenize. Range checks here, context-length checks in the routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from server.sampling_params import Seed, Temperature, TopK, TopP
from server.schemas import MAX_STOP, AnyText, ModelId, StrictRequest, Text, Usage, stop_list, utf8_text


# ---------------------------------------------------------------- generate
class GenerateRequest(StrictRequest):

    model: ModelId = None
    prompt: Text = Field(description="text to continue (a BOS token is prepended)")
    max_new_tokens: int = Field(64, ge=1, description="tokens to generate; prompt + these must fit the context")
    temperature: Temperature | None = 1.0
    top_k: TopK | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} stop strings (cut from the text)")
    stream: bool = Field(False, description="server-sent events, one per token batch")
    return_routing: bool = Field(False, description="per-token per-layer operator, entropy and MetaRouter gate")
    ignore_eos: bool = Field(False, description="keep generating past the EOS token")
    return_logprobs: bool = Field(False, description="natural-log probability of every token (prompt and generated) "
                                  "under the model's raw distribution (before temperature / top-k / top-p)")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        return stop_list(v)


class Timing(BaseModel):
    queue_seconds: float
    time_to_first_token_seconds: float | None
    total_seconds: float


class Flops(BaseModel):
    executed: float = Field(description="FLOPs this request's share of the forwards executed")
    dense: float = Field(description="what the full-attention baseline of equal size would spend")
    ratio: float

    @classmethod
    def of(cls, executed: float, dense: float) -> Flops:
        """Executed vs dense-baseline FLOPs; the ratio is 1 where nothing ran."""
        return cls(executed=executed, dense=dense, ratio=executed / dense if dense else 1.0)


class Routing(BaseModel):
    operator_names: list[str]
    tokens: list[str] = Field(description="token pieces that went through the model (prompt with BOS, then generated)")
    token_ids: list[int]
    prompt_tokens: int
    operator: list[list[int]] = Field(description="[token][layer] operator id (index into operator_names)")
    entropy: list[list[float | None]] = Field(description="[token][layer] spectral entropy (null where not computed)")
    gate: list[float | None] = Field(description="MetaRouter gate per token (null without MetaRouter)")
    thresholds: list[list[float]] = Field(
        default_factory=list,
        description="[layer] the entropy cut points the layer's router compares with (ChiarLM.routing_cut_points): "
                    "[] where the layer does not route (layer 1, layer L, the baseline), [tau] for the two-operator "
                    "router (entropy >= tau -> attention, else DCT), [p33, p67] for the three-operator one (below "
                    "p33 DCT, up to p67 RBF, above attention; its learned projection also votes)")


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: Literal["length", "stop", "eos"]
    usage: Usage
    timing: Timing
    flops: Flops
    routing: Routing | None = None
    logprobs: list[float | None] | None = Field(
        None, description="with return_logprobs: log-probability of each token, prompt (BOS first, null: it is never "
                          "predicted) then generated, i.e. usage.total_tokens entries; routing.tokens is this order "
                          "less the last generated token, which the model never processed")


# ---------------------------------------------------------------- perplexity
class PerplexityRequest(StrictRequest):

    model: ModelId = None
    text: str | list[str] = Field(description="one text or a list of texts")
    stride: int | None = Field(None, ge=1, description="sliding-window stride in tokens (default: half the context)")
    return_logprobs: bool = Field(False, description="per-token log-probabilities")
    return_routing: bool = Field(False, description="per-token per-layer operator, entropy and MetaRouter gate "
                                 "(`token_routing` of each result)")

    @field_validator("text")
    @classmethod
    def _text(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not v:
                raise ValueError("must not be an empty list")
            for i, item in enumerate(v):
                try:
                    utf8_text(item)
                except ValueError as exc:
                    raise ValueError(f"item {i} {exc}") from None
            return v
        return utf8_text(v)


class RoutingCounts(BaseModel):
    operator_names: list[str]
    per_layer: list[list[int]] = Field(description="[layer][operator] tokens, each input position counted once")
    attention_share: float | None = Field(description="share of routing-layer tokens sent to attention")


class TokenLogprob(BaseModel):
    token: str
    id: int
    logprob: float


class PerplexityResult(BaseModel):
    index: int
    tokens: int = Field(description="predicted tokens (the text's tokens; BOS is context only)")
    words: int
    bytes: int
    nll: float = Field(description="summed negative log-likelihood (nats)")
    mean_nll: float
    perplexity: float
    word_perplexity: float | None
    bits_per_byte: float | None
    windows: int
    logprobs: list[TokenLogprob] | None = None
    routing: RoutingCounts
    flops: Flops = Field(description="the forwards of this text's windows (overlapping windows recompute their "
                         "shared context)")
    token_routing: Routing | None = Field(
        None, description="with return_routing: routing of each input position (BOS, then every token but the last, "
                          "which is only ever predicted), taken from the window that scores the next token")


class PerplexityResponse(BaseModel):
    model: str
    window: int
    stride: int
    results: list[PerplexityResult]
    usage: Usage
    timing: Timing


# ---------------------------------------------------------------- tokenize
class TokenizeRequest(StrictRequest):

    model: ModelId = None
    text: AnyText
    add_bos: bool = True


class TokenizeResponse(BaseModel):
    token_ids: list[int]
    tokens: list[str]
    count: int
    max_context: int
