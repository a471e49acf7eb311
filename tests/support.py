"""What the test packages share: the repository root, real server processes, /metrics samples and the
one tiny-checkpoint builder. The server process and the Prometheus parser are the load tests' own
(loadtests/), so benchmarks, load tests, reliability probes and tests start and read servers one way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from loadtests.metrics_snapshot import Samples, samples
from loadtests.server_process import ROOT as REPO
from loadtests.server_process import ServerProcess, free_port

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["REPO", "WIKI", "Samples", "ServerProcess", "free_port", "in_process_app", "metric", "save_tiny_checkpoint", "scrape",
           "wait_ready"]

WIKI = REPO / "data" / "wikitext-2"  # valid.txt, test.txt
TINY = {"d_model": 32, "n_layers": 4, "n_heads": 2, "d_ff": 64}


def scrape(url: str) -> Samples:
    """GET url/metrics as {(sample name, sorted labels): value}."""
    return samples(httpx.get(url + "/metrics", timeout=10).text)


def metric(scraped: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (PromQL's sum(name{labels})); 0 when none."""
    want = set(labels.items())
    return sum(value for (sample, have), value in scraped.items() if sample == name and want <= set(have))


def save_tiny_checkpoint(path: Path, *, max_seq_len: int = 128, tokenizer: Tokenizer | None = None,
                         thresholds: list[float] | None = None) -> Path:
    """A tiny CHIAR checkpoint (d=32, 4 layers, 2 heads, weights seeded 0) saved at `path`.

    Tokenizer: given, or byte-level BPE (vocab 384) trained on the first 20 KB of WikiText-2 valid.
    Thresholds: given, or the median spectral entropy of each routing layer on WikiText text, so both
    operators get tokens.
    """
    import torch

    from model import ChiarConfig, ChiarLM, save_checkpoint
    from training.calibrate import calibrated_random_model
    from training.tokenizer import train_tokenizer

    text = (WIKI / "valid.txt").read_text(encoding="utf-8")[:20000]
    if tokenizer is None:
        tokenizer = train_tokenizer([text], vocab_size=384)
    config = ChiarConfig(vocab_size=tokenizer.get_vocab_size(), max_seq_len=max_seq_len, **TINY)  # type: ignore[arg-type]
    if thresholds is None:
        ids = torch.tensor([[config.bos_token_id, *tokenizer.encode(text[:4000]).ids[: config.max_seq_len - 1]]])
        model = calibrated_random_model(config, ids, seed=0)
    else:
        torch.manual_seed(0)
        model = ChiarLM(config.replace(thresholds=thresholds)).eval()
    return save_checkpoint(model, tokenizer, path)


def ran(out: Any, seconds_per_token: float) -> Any:
    """The RunnerOutput a runner returns when every part of SchedulerOutput `out` ran (scheduler tests)."""
    from server.engine.outputs import Part, RunnerOutput

    def part(job: Any, chunk: Any, n: int) -> Part:
        return Part(job, chunk, (job.id, -1), [0] * n, 0)

    decode = [part(j, None, 1) for j in out.decode]
    prefill = [part(c.job, c, c.end - c.start) for c in out.prefill]
    scored = [part(c.job, c, c.end - c.start) for c in out.score]
    tokens = len(decode) + out.prefill_tokens + out.score_tokens
    return RunnerOutput(decode, prefill, scored, [], [], tokens * seconds_per_token, [], None)


def in_process_app(checkpoint: Path, argv: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """(app, engine): the server's app over one checkpoint in this process (for TestClient); the engine
    starts with the app's lifespan."""
    from model import load_checkpoint
    from server.app import create_app
    from server.engine.engine import Engine
    from server.metrics import Metrics
    from server.service import Service
    from server.settings import Settings

    settings = Settings.from_sources(["--checkpoint", str(checkpoint), *argv], environ={})
    model, tokenizer = load_checkpoint(checkpoint)
    metrics = Metrics("cpu")
    engine = Engine(model, tokenizer, settings, metrics)
    return create_app(settings, [Service(settings, engine, tokenizer, checkpoint)], metrics), engine


def wait_ready(client: Any, seconds: float = 60.0) -> None:
    """Poll a TestClient's /ready until 200 (the engine warmed up)."""
    import time

    deadline = time.monotonic() + seconds
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "/ready never answered 200"
        time.sleep(0.05)
