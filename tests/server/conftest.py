"""Real `python -m server` processes on free loopback ports, driven over HTTP (tests.support)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

# re-exported: the server tests import these from here
from tests.support import REPO, ServerProcess, metric, save_tiny_checkpoint, scrape

__all__ = ["REPO", "ServerProcess", "metric", "scrape"]


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared default server (max batch 8) on the tiny checkpoint."""
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("logs") / "server.log",
                         # README's whole-test-set request raises the scoring cap too (the tiny tokenizer's
                         # 384-token vocabulary cuts WikiText-2 test into ~3x more tokens than the demo one)
                         env={"CHIAR_MAX_BATCH_SIZE": "8", "CHIAR_MAX_PROMPTS": "16", "CHIAR_MAX_SCORE_TOKENS": "2000000"}).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    """An HTTP client of the shared server."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server: ServerProcess) -> openai.OpenAI:
    """The real openai client against the shared server."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def long_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 1024-token context, so one generation lasts long enough to interrupt."""
    from tokenizers import Tokenizer

    from model import ChiarConfig

    thresholds = ChiarConfig.from_json((tiny_checkpoint / "config.json").read_text()).thresholds
    return save_tiny_checkpoint(tmp_path_factory.mktemp("long_checkpoint") / "chiar-long", max_seq_len=1024,
                                tokenizer=Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")), thresholds=thresholds)
