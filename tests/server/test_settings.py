"""Settings: precedence of defaults, CHIAR_* variables and flags; errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import Settings, SettingsError


def test_settings_precedence_and_parsing() -> None:
    env = {"CHIAR_CHECKPOINT": "/ckpt", "CHIAR_PORT": "9000", "CHIAR_MAX_BATCH_SIZE": "4", "CHIAR_CORS_ORIGINS": "http://a, http://b",
           "CHIAR_API_KEY": "k", "CHIAR_REQUEST_TIMEOUT": "2.5", "CHIAR_WARMUP": "false"}
    s = Settings.from_sources(["--port", "9100"], environ=env)
    assert s.checkpoint == [Path("/ckpt")] and s.port == 9100 and s.max_batch_size == 4
    assert s.cors_origins == ["http://a", "http://b"] and s.api_key == "k" and s.request_timeout == 2.5 and s.warmup is False
    assert s.served_model_name == "ckpt"
    defaults = Settings.from_sources(["--checkpoint", "/x/chiar-small"], environ={})
    assert defaults.host == "127.0.0.1" and defaults.api_key is None and defaults.served_model_name == "chiar-small"


def test_settings_several_checkpoints() -> None:
    """Repeated --checkpoint flags or a comma-separated CHIAR_CHECKPOINT; the first is the default model."""
    s = Settings.from_sources(["--checkpoint", "/x/chiar-small", "--checkpoint", "/y/baseline-small"], environ={})
    assert s.checkpoint == [Path("/x/chiar-small"), Path("/y/baseline-small")]
    assert s.model_ids == ["chiar-small", "baseline-small"] and s.served_model_name == "chiar-small"
    s = Settings.from_sources([], environ={"CHIAR_CHECKPOINT": "/x/a, /x/b"})
    assert s.model_ids == ["a", "b"]
    assert Settings.from_sources(["--checkpoint", "/x/a", "--model-name", "m"], environ={}).model_ids == ["m"]


@pytest.mark.parametrize(("argv", "env", "needle"), [
    ([], {}, "--checkpoint"),
    (["--checkpoint", "c", "--port", "70000"], {}, "--port"),
    (["--checkpoint", "c"], {"CHIAR_DEVICE": "tpu"}, "CHIAR_DEVICE"),
    (["--checkpoint", "c", "--dtype", "int3"], {}, "--dtype"),
    (["--checkpoint", "c", "--max-tokens-per-step", "0"], {}, "--max-tokens-per-step"),
    (["--checkpoint", "c"], {"CHIAR_REQUEST_TIMEOUT": "soon"}, "CHIAR_REQUEST_TIMEOUT"),
    (["--checkpoint", "c", "--api-key", "  "], {}, "--api-key"),
    (["--checkpoint", "a/c", "--checkpoint", "b/c"], {}, "a/c and b/c would both be served as model 'c'"),
    (["--checkpoint", "a", "--checkpoint", "b", "--model-name", "m"], {}, "--model-name / CHIAR_MODEL_NAME: only with one"),
])
def test_settings_errors_name_the_setting(argv: list[str], env: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        Settings.from_sources(argv, environ=env)
