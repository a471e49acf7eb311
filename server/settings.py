"""Server settings: defaults < CHIAR_* environment variables < command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEVICES_HELP = "auto (cuda when available), cpu, cuda or cuda:N"
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


class SettingsError(ValueError):
    """An invalid setting; the message names the flag and the environment variable."""


def _to_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _to_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _opt(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: None if text.strip().lower() in ("", "none") else parse(text)


@dataclass
class Settings:
    """Everything `python -m server` can be told; see `Settings.from_sources`."""

    checkpoint: Path | None = field(default=None, metadata={"parse": Path, "help": "checkpoint directory (config.json, model.safetensors, tokenizer.json)"})
    host: str = field(default="127.0.0.1", metadata={"parse": str, "help": "listen address"})
    port: int = field(default=8000, metadata={"parse": int, "help": "listen port"})
    device: str = field(default="auto", metadata={"parse": str, "help": DEVICES_HELP})
    dtype: str = field(default="auto", metadata={"parse": str, "help": "weights dtype: " + ", ".join(DTYPES) + " (auto: as stored)"})
    max_batch_size: int = field(default=0, metadata={"parse": int, "help": "most sequences decoded together (0: from the KV-cache budget, at most 256)"})
    max_tokens_per_step: int = field(default=4096, metadata={"parse": int, "help": "most prefill + scoring tokens in one engine step"})
    step_target_ms: float = field(default=50.0, metadata={"parse": float, "help": "target engine step time (bounds the inter-token latency); prefill and scoring chunks are sized from measured throughput to fit it"})
    kv_cache_mb: float = field(default=512.0, metadata={"parse": float, "help": "KV-cache memory budget in MiB; admission counts each sequence's actual routed cache against it"})
    queue_size: int = field(default=64, metadata={"parse": int, "help": "most sequences waiting; beyond it requests get 503 + Retry-After"})
    request_timeout: float = field(default=120.0, metadata={"parse": float, "help": "seconds from arrival to the last token before a request is cancelled"})
    api_key: str | None = field(default=None, metadata={"parse": lambda text: text or None, "help": "require 'Authorization: Bearer KEY' (prefer the CHIAR_API_KEY variable)"})
    cors_origins: list[str] = field(default_factory=list, metadata={"parse": _to_list, "help": "comma-separated allowed CORS origins"})
    max_body_bytes: int = field(default=1_048_576, metadata={"parse": int, "help": "largest request body; larger ones get 413"})
    max_prompts: int = field(default=16, metadata={"parse": int, "help": "most prompts/texts in one request"})
    model_name: str | None = field(default=None, metadata={"parse": _opt(str), "help": "model id in the OpenAI API (default: checkpoint directory name)"})
    threads: int | None = field(default=None, metadata={"parse": _opt(int), "help": "torch intra-op threads (default: torch's choice)"})
    drain_timeout: float = field(default=30.0, metadata={"parse": float, "help": "seconds SIGTERM waits for in-flight requests"})
    warmup: bool = field(default=True, metadata={"parse": _to_bool, "help": "run warm-up forwards before /ready turns 200"})
    log_level: str = field(default="info", metadata={"parse": str, "help": "uvicorn log level"})
    body_timeout: float = field(default=30.0, metadata={"parse": float, "help": "seconds to receive a request body before 408"})
    fault_inject: str | None = field(default=None, metadata={"parse": _opt(str), "help": "testing only: STAGE:TOKEN_ID makes requests containing that token fail at STAGE (model, sample, score)"})

    def validate(self) -> None:
        """Raise SettingsError naming the first invalid setting."""

        def bad(name: str, message: str) -> SettingsError:
            return SettingsError(f"{flag(name)} / {env_name(name)}: {message}")

        if self.checkpoint is None:
            raise bad("checkpoint", "is required")
        if not 0 <= self.port <= 65535:
            raise bad("port", f"must be in [0, 65535], got {self.port}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise bad("device", f"must be {DEVICES_HELP}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_tokens_per_step", "max_body_bytes", "max_prompts"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_batch_size < 0:
            raise bad("max_batch_size", f"must be >= 0 (0: automatic), got {self.max_batch_size}")
        if self.fault_inject is not None:
            stage, _, token = self.fault_inject.partition(":")
            if stage not in ("model", "sample", "score") or not token.isdigit():
                raise bad("fault_inject", f"must be STAGE:TOKEN_ID with STAGE model, sample or score, got {self.fault_inject!r}")
        if self.queue_size < 0:
            raise bad("queue_size", f"must be >= 0, got {self.queue_size}")
        for name in ("request_timeout", "drain_timeout", "step_target_ms", "kv_cache_mb", "body_timeout"):
            if not getattr(self, name) > 0:
                raise bad(name, f"must be > 0, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise bad("threads", f"must be >= 1, got {self.threads}")
        if self.api_key is not None and not self.api_key.strip():
            raise bad("api_key", "must not be blank")

    @property
    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        return Path(self.checkpoint).resolve().name if self.checkpoint else "chiar"

    @classmethod
    def from_sources(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from defaults, then `CHIAR_<NAME>` variables, then flags; validate them."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None:
                values[f.name] = _parse(f, raw, env_name(f.name))
        parser = argparse.ArgumentParser(prog="python -m server", description="CHIAR-Former inference server")
        for f in dataclasses.fields(cls):
            parser.add_argument(flag(f.name), dest=f.name, default=None, metavar=f.name.upper(),
                                help=f"{f.metadata['help']} [env {env_name(f.name)}]")
        args = parser.parse_args(argv)
        for f in dataclasses.fields(cls):
            raw = getattr(args, f.name)
            if raw is not None:
                values[f.name] = _parse(f, raw, flag(f.name))
        settings = cls(**values)
        settings.validate()
        return settings


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return "CHIAR_" + name.upper()


def _parse(f: dataclasses.Field, raw: str, source: str) -> Any:
    try:
        return f.metadata["parse"](raw)
    except ValueError as exc:
        raise SettingsError(f"{source}: cannot parse {raw!r}: {exc}") from exc
