"""Server settings (pydantic): defaults < CHIAR_* environment variables < command-line flags.

Adding a setting is one line in `Settings`: a type, a default and its help (`description`); the
flag (`--max-batch-size`) and the variable (`CHIAR_MAX_BATCH_SIZE`) follow from the name.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from model.config import DTYPES as WEIGHT_DTYPES
from model.device import DEVICE_HELP, Device
from model.validation import problem

DTYPES = ("auto", *WEIGHT_DTYPES)
REPEATABLE = {"checkpoint"}  # flags that may be given more than once (a list); their variable is comma-separated


class SettingsError(ValueError):
    """An invalid setting; the message names the flag and the environment variable."""


def _none_word(value: Any) -> Any:
    """'' and 'none' mean "not set" for optional settings given as text."""
    return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value


def _comma_list(value: Any) -> Any:
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


def _checkpoints(value: Any) -> Any:
    """Checkpoint paths: repeated flags arrive as a list, the variable as comma-separated text."""
    if isinstance(value, str):
        return _comma_list(value)
    if isinstance(value, list):
        return [part for item in value for part in (_comma_list(item) if isinstance(item, str) else [item])]
    return value


def _not_blank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be blank")
    return value


def _fault_spec(value: str | None) -> str | None:
    if value is not None:
        stage, _, token = value.partition(":")
        if stage not in ("model", "sample", "score") or not token.isdigit():
            raise ValueError(f"must be STAGE:TOKEN_ID with STAGE model, sample or score, got {value!r}")
    return value


NoneWord = BeforeValidator(_none_word)
ApiKey = Annotated[str | None, BeforeValidator(lambda v: v or None), AfterValidator(_not_blank)]
CommaList = Annotated[list[str], BeforeValidator(_comma_list)]


class Settings(BaseModel):
    """Everything `python -m server` can be told; see `Settings.from_sources`."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: Annotated[list[Path], BeforeValidator(_checkpoints)] = Field(
        [], description="checkpoint directory (config.json, model.safetensors, tokenizer.json); repeat the flag (or comma-separate "
        "the variable) to serve several models, the first is the default")
    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(8000, ge=0, le=65535, description="listen port")
    device: Device = Field("auto", description=DEVICE_HELP)
    dtype: Literal[DTYPES] = Field("auto", description="weights dtype: " + ", ".join(DTYPES) + " (auto: as stored)")
    max_batch_size: int = Field(0, ge=0, description="most sequences decoded together (0: from the KV-cache budget, at most 256)")
    max_tokens_per_step: int = Field(4096, ge=1, description="most prefill + scoring tokens in one engine step")
    score_stretch: float = Field(1.25, ge=1.0, description="while sequences decode, scoring chunks may lengthen a step to at most "
                                 "this many times its decode-only time (a perplexity flood cannot slow the streams beyond that)")
    step_target_ms: float = Field(50.0, gt=0, description="target engine step time (bounds the inter-token latency); prefill and "
                                  "scoring chunks are sized from the measured throughput to fit it")
    kv_cache_mb: float = Field(
        512.0, gt=0, description="KV-cache memory budget in MiB; admission counts each sequence's actual routed cache against it"
    )
    prefix_cache: bool = Field(
        True,
        description="reuse the routed KV of prompt prefixes already computed (cached inside the KV "
        "budget, least recently used evicted first); --no-prefix-cache turns it off",
    )
    queue_size: int = Field(64, ge=0, description="most sequences waiting; beyond it requests get 503 + Retry-After")
    request_timeout: float = Field(120.0, gt=0, description="seconds from arrival to the last token before a request is cancelled")
    api_key: ApiKey = Field(None, description="require 'Authorization: Bearer KEY' (prefer the CHIAR_API_KEY variable)")
    cors_origins: CommaList = Field([], description="comma-separated allowed CORS origins")
    max_body_bytes: int = Field(1_048_576, ge=1, description="largest request body; larger ones get 413")
    max_inflight_body_bytes: int = Field(
        8_388_608,
        ge=1,
        description="most bytes of request bodies all in-flight requests "
        "hold together; a body beyond it gets 503 + Retry-After (one larger than it, 413)",
    )
    max_prompts: int = Field(16, ge=1, description="most prompts/texts in one request")
    model_name: Annotated[str | None, NoneWord] = Field(
        None, description="model id in the API (default: checkpoint directory name); only with one checkpoint"
    )
    threads: Annotated[int | None, NoneWord] = Field(
        None,
        ge=1,
        description="intra-op threads of the model's forward (default: "
        "the cores available minus one, at least one: the HTTP side keeps a core, "
        "since a parallel step stalls whenever one of its threads loses its core)",
    )
    serial_below: int = Field(
        256,
        ge=0,
        description="a step carrying fewer tokens than this runs its forward on one thread: "
        "small steps lose more to thread hand-offs (and to the HTTP thread taking a core) than a second "
        "core gives them; 0: every step on --threads",
    )
    kernels: Literal["auto", "native", "eager"] = Field(
        "auto",
        description="the inference step's kernels: native (csrc/, float32 on "
        "the CPU: batch-invariant, the fast path), eager (PyTorch ops, any device and "
        "dtype), auto: native where they can run, else eager",
    )
    drain_timeout: float = Field(30.0, gt=0, description="seconds SIGTERM waits for in-flight requests")
    warmup: bool = Field(True, description="run warm-up forwards before /ready turns 200")
    log_level: str = Field("info", description="uvicorn log level")
    body_timeout: float = Field(30.0, gt=0, description="seconds to receive a request body before 408")
    max_new_tokens: Annotated[int | None, NoneWord] = Field(
        None,
        ge=1,
        description="most new tokens one request may ask for per choice (max_tokens, max_completion_tokens, "
        "max_new_tokens; 400 beyond, and declared in /openapi.json); default: what each model's context leaves",
    )
    malloc_trim: bool = Field(
        True,
        description="give freed heap memory back to the OS after request bursts (glibc "
        "malloc_trim whenever the RSS grew by 16 MiB; docs/ARCHITECTURE.md)",
    )
    max_score_tokens: int = Field(
        131_072,
        ge=1,
        description="most tokens one perplexity or tokenize request may score or "
        "return (400 beyond, refused before the text is tokenized whole)",
    )
    fault_inject: Annotated[str | None, NoneWord, AfterValidator(_fault_spec)] = Field(
        None, description="testing only: STAGE:TOKEN_ID makes requests containing that token fail at STAGE (model, sample, score)"
    )

    @property
    def forward_threads(self) -> int:
        """--threads, or the cores this process may run on minus one (at least one)."""
        return self.threads or max(1, len(os.sched_getaffinity(0)) - 1)

    @property
    def served_model_name(self) -> str:
        """The default (first) model's id."""
        return self.model_ids[0] if self.checkpoint else "chiar"

    @property
    def model_ids(self) -> list[str]:
        """One id per checkpoint, in order: --model-name for a single one, else the directory name."""
        if self.model_name:
            return [self.model_name]
        return [Path(path).resolve().name for path in self.checkpoint]

    @classmethod
    def from_sources(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from defaults, then `CHIAR_<NAME>` variables, then flags; validate them."""
        raw, given_by = layered(
            cls, argv, os.environ if environ is None else environ, prog="python -m server", description="CHIAR-Former inference server"
        )
        try:
            settings = cls.model_validate(raw)
        except ValidationError as exc:
            raise SettingsError(_describe(exc.errors()[0], raw, given_by)) from None
        if not settings.checkpoint:
            raise SettingsError(f"{flag('checkpoint')} / {env_name('checkpoint')}: is required")
        if settings.model_name and len(settings.checkpoint) > 1:
            raise SettingsError(
                f"{flag('model_name')} / {env_name('model_name')}: only with one checkpoint; with several, "
                "each model's id is its checkpoint directory name"
            )
        seen: dict[str, Path] = {}
        for path, model_id in zip(settings.checkpoint, settings.model_ids):
            if model_id in seen:
                raise SettingsError(
                    f"{flag('checkpoint')} / {env_name('checkpoint')}: {seen[model_id]} and {path} would both be "
                    f"served as model {model_id!r} (the id is the directory name); rename one directory"
                )
            seen[model_id] = path
        return settings


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return "CHIAR_" + name.upper()


def layered(
    cls: type[BaseModel], argv: Sequence[str] | None, environ: Mapping[str, str], *, prog: str, description: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """Raw text per field, `CHIAR_<NAME>` variables overridden by `--name` flags (defaults: absent),
    and which variable or flag gave each value."""
    raw: dict[str, Any] = {}
    given_by: dict[str, str] = {}
    for name in cls.model_fields:
        if env_name(name) in environ:
            raw[name], given_by[name] = environ[env_name(name)], env_name(name)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, info in cls.model_fields.items():
        if info.annotation is bool:  # `--name` alone means true, `--no-name` false; `--name false` works too
            parser.add_argument(
                flag(name),
                dest=name,
                default=None,
                metavar=name.upper(),
                nargs="?",
                const="true",
                help=f"{info.description} [env {env_name(name)}]",
            )
            parser.add_argument(
                "--no-" + name.replace("_", "-"), dest=name, action="store_const", const="false", help=f"same as {flag(name)} false"
            )
            continue
        parser.add_argument(
            flag(name),
            dest=name,
            default=None,
            metavar=name.upper(),
            action="append" if name in REPEATABLE else "store",
            help=f"{info.description} [env {env_name(name)}]",
        )
    for name, value in vars(parser.parse_args(argv)).items():
        if value is not None:
            raw[name], given_by[name] = value, flag(name)
    return raw, given_by


def _describe(error: Any, raw: Mapping[str, str], given_by: Mapping[str, str]) -> str:
    """A pydantic error as SettingsError text: unparsable text names where it came from, an
    out-of-range value names both the flag and the variable."""
    name = str(error["loc"][0])
    if error["type"].endswith(("_parsing", "_type")):
        return f"{given_by[name]}: cannot parse {raw[name]!r}: {error['msg']}"
    return f"{flag(name)} / {env_name(name)}: {problem(error)}"
