"""Request and response models of the OpenAI protocol: /v1/completions, /v1/chat/completions and
/v1/models.

Completions requests are strict like the native ones (server/schemas.py StrictRequest, unknown fields
ignored). Chat types follow JSON Schema exactly, so the OpenAPI document says what is accepted: no bools
as numbers, no strings as numbers or bools, no 0/1 as bools; an integer may be written 1.0 (JSON Schema
calls that an integer too). Unknown fields are ignored like OpenAI's; unsupported ones are declared
(e.g. penalties: only 0) and rejected with a 400 naming the field. The sampling fields are
server/sampling_params.py, the same types on every route.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from server.sampling_params import NUMBER, Seed, Temperature, TopK, TopP
from server.schemas import (
    LONG_LIST,
    MAX_STOP,
    AnyText,
    Float,
    Int,
    ModelId,
    StreamOptions,
    StrictRequest,
    Usage,
    stop_list,
    utf8_text,
)

LAX = ConfigDict(extra="ignore")  # chat: JSON Schema types (NUMBER), unknown fields ignored
_TOKEN_IDS = TypeAdapter(list[int], config=ConfigDict(strict=True))
NewTokens = Annotated[int, Field(ge=1), NUMBER]
TopLogprobs = Annotated[int, Field(ge=0, le=5), NUMBER]
ZeroOnly = Annotated[float, Field(ge=0, le=0), NUMBER]
StopText = Annotated[str, Field(min_length=1)]
Unsupported = "not supported: only the neutral value is accepted"


class OpenAISampling(BaseModel):
    """The sampling and streaming fields /v1/completions and /v1/chat/completions share (one declaration)."""

    temperature: Temperature | None = 1.0
    top_p: TopP | None = 1.0
    top_k: TopK | None = None
    n: Int = Field(1, ge=1, le=8)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None


# ---------------------------------------------------------------- completions
class CompletionRequest(StrictRequest, OpenAISampling):
    """OpenAI /v1/completions; unknown fields are ignored, unsupported ones rejected."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: ModelId = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    ignore_eos: bool = Field(False, description="vLLM's extension: keep generating past EOS (load generators such as "
                             "guidellm send it to get exactly max_tokens)")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        return stop_list(v)

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _long_id_list(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """A long list of ids is checked as ids only: the union would also try it as texts and lists of ids,
        building an error per item for each (60 ms of the event loop for a 1 MiB body)."""
        if not (isinstance(value, list) and len(value) > LONG_LIST and type(value[0]) is int):
            return handler(value)
        try:
            return _TOKEN_IDS.validate_python(value)
        except ValidationError as exc:
            index = exc.errors()[0]["loc"][0]
            raise ValueError(f"item {index} is {value[index]!r}, not a token id (an integer)") from None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v not in (None, 0, 0.0):
            raise ValueError("is not supported (only 0)")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("is not supported (only 1)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("is not supported")
        return v


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chiar"
    max_model_len: int
    arch: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- chat request
class TextPart(BaseModel):
    model_config = LAX
    type: Literal["text"]
    text: AnyText


class ChatMessage(BaseModel):
    """One turn; `content` is text or a list of text parts (other part types are rejected)."""

    model_config = LAX
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[TextPart] | None) -> str | list[TextPart] | None:
        return utf8_text(v, empty_ok=True) if isinstance(v, str) else v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    model_config = LAX
    type: Literal["text"] = Field(description="only plain text is supported")


class ChatCompletionRequest(OpenAISampling):
    """OpenAI /v1/chat/completions."""

    model_config = LAX

    model: ModelId = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: NewTokens | None = Field(None, description="new tokens at most (default: the rest of the context); "
                                              "the rendered chat + these must fit max_model_len")
    max_tokens: NewTokens | None = Field(None, description="older name of max_completion_tokens (which wins when both are sent)")
    ignore_eos: StrictBool = Field(False, description="vLLM's extension: keep generating past EOS (load generators such as "
                                   "guidellm send it to get exactly max_completion_tokens)")
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"up to {MAX_STOP} non-empty stop strings (cut from the text)")
    seed: Seed | None = None
    logprobs: StrictBool = False
    top_logprobs: TopLogprobs | None = Field(None, description="alternatives per token (used with logprobs: true)")
    presence_penalty: ZeroOnly | None = Field(None, description=Unsupported)
    frequency_penalty: ZeroOnly | None = Field(None, description=Unsupported)
    logit_bias: dict[str, Float] | None = Field(None, max_length=0, description=Unsupported)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=0, description=Unsupported)
    tool_choice: Literal["none"] | None = Field(None, description=Unsupported)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        items = [] if v is None else [v] if isinstance(v, str) else list(v)
        for item in items:
            utf8_text(item, empty_ok=True)
        return items

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
