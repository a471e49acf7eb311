"""vLLM-compatible /tokenize, /detokenize and /tokenizer_info (what lm-eval's remote tokenizer calls).

/tokenize follows vLLM and Hugging Face: a special-token string such as "<bos>" in `prompt` maps to its
id, exactly like `AutoTokenizer.from_pretrained(checkpoint_dir)`. Prompt text sent to the generation
endpoints never does (there "<eos>" is plain text); send token ids to use control tokens.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from tokenizers import Tokenizer

from model.hf_tokenizer import hf_settings
from server import routes
from server.chat import templates
from server.errors import ERRORS, invalid
from server.service import ServedModels, off_loop
from server.token_limits import LimitedEncoder
from server.tokenizer_schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChat,
    TokenizeCompletion,
    TokenizerInfo,
    VllmTokenizeResponse,
)


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # its parts (ChatMessage, TextPart) are components through the chat route
    return schema


TOKENIZE_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "anyOf": [_schema(TokenizeCompletion), _schema(TokenizeChat)]}}}}}


async def parse_tokenize(request: Request) -> TokenizeCompletion | TokenizeChat:
    """A body with `messages` is a chat request, otherwise a prompt; errors are the usual 400 naming the field."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    model: type[TokenizeCompletion] | type[TokenizeChat] = TokenizeChat if isinstance(data, dict) and "messages" in data \
        else TokenizeCompletion
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _parsing(tokenizer: Tokenizer) -> Tokenizer:
    """A separate instance that maps special-token strings to their ids (the service's treats them as text)."""
    parsing = Tokenizer.from_str(tokenizer.to_str())
    parsing.encode_special_tokens = False
    return parsing


def register(app: FastAPI, served: ServedModels) -> None:
    """Add the tokenizer routes to `app`."""
    template = templates(served)
    parsers = {svc.name: LimitedEncoder(_parsing(svc.tokenizer), svc.bos) for svc in served}

    @app.post(routes.TOKENIZE.path, response_model=VllmTokenizeResponse, response_model_exclude_none=True, responses=ERRORS,
              tags=["tokenizer"], openapi_extra=TOKENIZE_BODY)
    async def tokenize(request: Request) -> VllmTokenizeResponse:
        body = await parse_tokenize(request)
        svc = served.get(body.model, request)
        if isinstance(body, TokenizeChat):
            chat = template[svc.name]
            messages, prompt = body.messages, body.add_generation_prompt
            size = sum(len(m.text()) for m in messages)
            ids = await off_loop(size, lambda: chat.encode(svc, messages, prompt, tokenize=True))
        else:
            ids = (await svc.scored_ids([body.prompt], "prompt", "tokenize", encoder=parsers[svc.name]))[0].ids
        if not body.add_special_tokens:
            ids = ids[1:]
        strs = [svc.token_str(i) for i in ids] if body.return_token_strs else None
        return VllmTokenizeResponse(count=len(ids), max_model_len=svc.max_model_len, tokens=ids, token_strs=strs)

    @app.post(routes.DETOKENIZE.path, response_model=DetokenizeResponse, responses=ERRORS, tags=["tokenizer"])
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        svc = served.get(body.model, request)
        vocab = svc.config.vocab_size
        bad = [i for i, t in enumerate(body.tokens) if t >= vocab]
        if bad:
            raise invalid("tokens", f"tokens[{bad[0]}] = {body.tokens[bad[0]]} is outside [0, {vocab})")
        tokens = body.tokens
        return DetokenizeResponse(prompt=await off_loop(len(tokens), lambda: svc.tokenizer.decode(tokens, skip_special_tokens=False)))

    settings = {svc.name: hf_settings(svc.checkpoint) for svc in served}

    @app.get(routes.TOKENIZER_INFO.path, response_model=TokenizerInfo, tags=["tokenizer"])
    async def tokenizer_info(request: Request, model: str | None = None) -> TokenizerInfo:
        """The tokenizer of `model` (query parameter; default: the default model): the settings its
        tokenizer_config.json holds (`python -m model.hf_tokenizer` writes them), and the special-token ids."""
        svc = served.get(model, request)
        cfg, hf = svc.config, settings[svc.name]
        return TokenizerInfo(
            tokenizer_class=hf["tokenizer_class"], bos_token=hf.get("bos_token"), eos_token=hf.get("eos_token"),
            pad_token=hf.get("pad_token"), bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.pad_token_id, vocab_size=cfg.vocab_size, model_max_length=hf["model_max_length"],
            chat_template=template[svc.name].source, add_bos_token=hf["add_bos_token"], add_eos_token=hf["add_eos_token"],
        )
