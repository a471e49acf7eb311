"""The batch-invariance probe: a seed means one text, whatever else the server is doing.

Each trial sends one seeded, sampled completion with log-probabilities to an idle server, then the
same request again while a changing mix of other work runs (generations of other lengths and
temperatures, a long prompt prefilled in chunks, perplexity scoring), and compares the two answers'
choices byte for byte: text, tokens, log-probabilities, top alternatives, finish reason.
"""

from __future__ import annotations

import json
import random
import threading

from reliability.http import post_json
from reliability.report import ProbeResult
from reliability.server_probes import AUTH, Env, start


def _choices(url: str, body: dict) -> str | None:
    reply = post_json(url, "/v1/completions", body, AUTH)
    return json.dumps(json.loads(reply.body)["choices"], sort_keys=True) if reply.status == 200 else None


def _mix(url: str, trial: int, stop: threading.Event) -> None:
    """Other work until `stop`: its shape changes with the trial."""
    rng = random.Random(trial)
    while not stop.is_set():
        kind = rng.randrange(3)
        if kind == 0:
            post_json(url, "/v1/completions", {"prompt": "word " * rng.randrange(1, 40), "max_tokens": rng.randrange(2, 30),
                                               "temperature": rng.choice([0.0, 0.7, 1.2]), "seed": rng.randrange(1000)}, AUTH)
        elif kind == 1:
            post_json(url, "/v1/completions", {"prompt": "the city and its river " * rng.randrange(20, 60), "max_tokens": 2}, AUTH)
        else:
            post_json(url, "/v1/perplexity", {"text": "a text to score " * rng.randrange(10, 80)}, AUTH)


def probe_batch_invariance(env: Env) -> ProbeResult:
    trials = 10 if env.short else 50
    # a small step target: long prompts and scoring windows are cut into chunks beside the decodes
    server = start(env, "server-invariance", CHIAR_STEP_TARGET_MS="5")
    diffs: list[str] = []
    try:
        for trial in range(trials):
            body = {"prompt": f"Trial {trial}: the history of the", "max_tokens": 24, "temperature": 0.8, "top_p": 0.95,
                    "seed": 7000 + trial, "logprobs": 3}
            alone = _choices(server.url, body)
            stop = threading.Event()
            load = [threading.Thread(target=_mix, args=(server.url, trial * 10 + k, stop)) for k in range(3)]
            for t in load:
                t.start()
            loaded = [_choices(server.url, body) for _ in range(2)]
            stop.set()
            for t in load:
                t.join()
            if alone is None or any(answer != alone for answer in loaded):
                diffs.append(f"trial {trial} (seed {7000 + trial}): the answers under load differ from the answer alone")
    finally:
        server.stop()
    return ProbeResult(
        "batch-invariance", "the same seeded sampled completion (temperature 0.8, top_p 0.95, logprobs 3) alone, then twice "
        "beside 3 clients sending other generations, chunked long prompts and perplexity scoring", trials * 3,
        f"{trials - len(diffs)} of {trials} trials gave identical bytes (text, tokens, log-probabilities) alone and under load",
        f"{len(diffs)} trials differed", passed=not diffs, failures=diffs, figures={"trials": trials, "identical": trials - len(diffs)})
