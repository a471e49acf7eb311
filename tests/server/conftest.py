"""Real `python -m server` processes on free loopback ports, driven over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One uvicorn server process; `url` once /ready answers 200."""

    def __init__(self, checkpoint: Path, log_path: Path, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.checkpoint = checkpoint
        self.log_path = log_path
        self.env = env or {}
        self.args = args or []
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 90.0) -> ServerProcess:
        for _ in range(3):  # a port taken between probe and bind: try another
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            env = {**os.environ, "PYTHONPATH": str(REPO), "CHIAR_THREADS": "1", **self.env}
            cmd = [sys.executable, "-m", "server", "--checkpoint", str(self.checkpoint), "--host", "127.0.0.1", "--port", str(port), *self.args]
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    if httpx.get(self.url + "/ready", timeout=1.0).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            self.stop()
            if b"address already in use" not in self.log_path.read_bytes().lower():
                break
        raise RuntimeError(f"server did not become ready; log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = httpx.get(url + "/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (PromQL's sum(name{labels})), e.g. over models."""
    want = set(labels.items())
    return sum(value for (sample, have), value in samples.items() if sample == name and want <= set(have))


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared default server (max batch 8) on the tiny checkpoint."""
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("logs") / "server.log",
                         # README's whole-test-set request raises the scoring cap too (the tiny tokenizer's
                         # 384-token vocabulary cuts WikiText-2 test into ~3x more tokens than the demo one)
                         env={"CHIAR_MAX_BATCH_SIZE": "8", "CHIAR_MAX_PROMPTS": "16", "CHIAR_MAX_SCORE_TOKENS": "2000000"}).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def long_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 1024-token context, so one generation lasts long enough to interrupt."""
    import torch
    from tokenizers import Tokenizer

    from model import ChiarConfig, ChiarLM, save_checkpoint

    config = ChiarConfig.from_json((tiny_checkpoint / "config.json").read_text()).replace(max_seq_len=1024)
    torch.manual_seed(0)
    model = ChiarLM(config).eval()
    path = tmp_path_factory.mktemp("long_checkpoint") / "chiar-long"
    save_checkpoint(model, Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")), path)
    return path
