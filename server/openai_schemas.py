"""Request/response models of /v1/chat/completions and the vLLM-style tokenizer endpoints.

Strict types (no bools as numbers, no strings as numbers or bools); unknown fields in chat requests
are ignored like OpenAI's, unsupported ones are rejected with a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.schemas import MAX_SEED, MAX_STOP, Usage

STRICT = ConfigDict(strict=True, extra="ignore")
STRICT_FORBID = ConfigDict(strict=True, extra="forbid")
MAX_TOP_LOGPROBS = 5

Temperature = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False, description="0 = greedy")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus mass in (0, 1]")]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="same seed -> same text; choice j uses seed + j")]


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"is not valid Unicode text (unpaired surrogate at character {exc.start})") from None
    return value


# ---------------------------------------------------------------- chat request
class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        return _utf8(v)


class ChatMessage(BaseModel):
    """One turn; `content` is text or a list of text parts (other part types are rejected)."""

    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[TextPart] | None) -> str | list[TextPart] | None:
        return _utf8(v) if isinstance(v, str) else v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text"] = Field(description="only plain text is supported")


class ChatCompletionRequest(BaseModel):
    """OpenAI /v1/chat/completions."""

    model_config = STRICT

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="new tokens at most (default: the rest of the context)")
    max_tokens: int | None = Field(None, ge=1, description="older name of max_completion_tokens")
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: int | None = Field(None, ge=1, description="extension: sample among the k most likely tokens")
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} stop strings (cut from the text)")
    seed: Seed | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="needs logprobs: true")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        items = [] if v is None else [v] if isinstance(v, str) else list(v)
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(items)}")
        for item in items:
            if not item:
                raise ValueError("must not be empty")
            _utf8(item)
        return items

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v not in (None, 0, 0.0):
            raise ValueError("is not supported (only 0)")
        return v

    @field_validator("logit_bias", "tools")
    @classmethod
    def _unsupported(cls, v: Any) -> Any:
        if v:
            raise ValueError("is not supported")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if v not in (None, "none"):
            raise ValueError("is not supported (only 'none')")
        return v

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------- chat response
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------- vLLM-style tokenizer endpoints
class TokenizeCompletion(BaseModel):
    """Text to ids: special-token strings map to their ids (as in vLLM / HF); add_special_tokens prepends BOS."""

    model_config = STRICT_FORBID
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return _utf8(v)


class TokenizeChat(BaseModel):
    """Chat messages rendered with the chat template, then tokenized like /v1/chat/completions does."""

    model_config = STRICT_FORBID
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    return_token_strs: bool = False


class VllmTokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = STRICT_FORBID
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """What a remote client needs to tokenize like the server (lm-eval's remote tokenizer reads this)."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    vocab_size: int
    model_max_length: int
    chat_template: str
    add_bos_token: bool = Field(description="the server prepends BOS to every prompt (text prompts and id prompts not starting with it)")
