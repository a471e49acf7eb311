"""The scheduler alone (pure Python): budget, lanes, shortest-remaining-first with aging, admission."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine.requests import GenerateJob, GenParams, ScoreJob
from server.engine.scheduler import (
    MIN_CHUNK,
    MIN_SCORE_CHUNK,
    CostModel,
    Scheduler,
    SchedulerLimits,
    StepStats,
    chunk_size,
)
from tests.server.conftest import REPO
from tests.support import ran

LOOP = asyncio.new_event_loop()


def limits(**kw: float) -> SchedulerLimits:
    base = dict(max_batch_size=8, queue_size=100, max_step_tokens=4096, step_target_seconds=0.05,
                kv_budget_bytes=10**9, kv_bytes_per_token=100.0, max_seq_len=1024)
    base.update(kw)
    return SchedulerLimits(**base)  # type: ignore[arg-type]


def gen(n_prompt: int, new: int = 4, arrival: float = 0.0) -> GenerateJob:
    job = GenerateJob(list(range(1, n_prompt + 1)), GenParams(max_new_tokens=new), queue=asyncio.Queue(), loop=LOOP,
                      index=0, timeout=1e9)
    job.arrival = arrival
    return job


def score(n_tokens: int, window: int = 128, arrival: float = 0.0) -> ScoreJob:
    job = ScoreJob([list(range(n_tokens))], window, window // 2, None, queue=asyncio.Queue(), loop=LOOP, index=0, timeout=1e9)
    job.arrival = arrival
    return job


def run_step(s: Scheduler, now: float, seconds_per_token: float = 1e-4):
    """schedule, pretend the runner ran it, update; prompts that complete start decoding, and a
    generation ends after its max_new_tokens (as the output processor would end it)."""
    out = s.schedule(now)
    started = [c.job for c in out.prefill if c.last]
    for job in [*out.decode, *started]:
        job.tokens.append(0)
    finished = [j for j in [*out.decode, *started] if len(j.tokens) >= j.params.max_new_tokens]
    s.update_from_output(out, ran(out, seconds_per_token), finished, started, 0, (0, 0))
    s.drop([job for job in s.scoring if not job.pending])  # the output processor ends scoring jobs with no window left
    return out


def test_scheduler_imports_without_torch() -> None:
    code = "import sys, server.engine.scheduler; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


@settings(max_examples=60, deadline=None)
@given(prompts=st.lists(st.integers(1, 900), max_size=6), texts=st.lists(st.integers(2, 3000), max_size=4),
       target_ms=st.floats(5, 200), per_token=st.floats(1e-5, 1e-3))
def test_no_step_exceeds_its_budget_and_all_work_finishes(prompts: list[int], texts: list[int], target_ms: float,
                                                          per_token: float) -> None:
    s = Scheduler(limits(step_target_seconds=target_ms / 1000))
    s.add([gen(n) for n in prompts] + [score(n) for n in texts])
    for step in range(2000):
        if not (s.waiting or s.prefilling or s.scoring):
            break
        out = run_step(s, step * 0.01, per_token)
        # a prompt may end up to MIN_CHUNK past the budget rather than leave a tiny remainder
        assert out.prefill_tokens + out.score_tokens <= out.budget + MIN_CHUNK * len(out.prefill)
        assert out.budget >= MIN_CHUNK
        assert all(c.end > c.start for c in [*out.prefill, *out.score])
        assert all(c.end - c.start >= MIN_CHUNK or c.last for c in out.prefill)
    assert not (s.waiting or s.prefilling or s.scoring), "work left over"
    assert all(job.prefilled == len(job.prompt_ids) for job in s.running)


def test_lanes_share_the_budget_when_both_have_work() -> None:
    s = Scheduler(limits())
    s.cost.chunk_seconds_per_token = 1e-4  # budget 500 tokens
    s.add([score(100_000), gen(5000)])
    out = s.schedule(0.0)
    assert out.prefill_tokens == out.budget // 2
    assert out.score_tokens == out.budget - out.budget // 2


def test_a_short_request_overtakes_long_ones_and_long_ones_are_not_starved() -> None:
    s = Scheduler(limits(max_batch_size=100))
    s.cost.chunk_seconds_per_token = 1e-3  # budget 50 tokens a step, 1000 tokens/s aging
    longs = [gen(400, arrival=0.0) for _ in range(3)]
    s.add(longs)
    run_step(s, 0.0, 1e-3)
    short = gen(3, arrival=0.01)
    s.add([short])
    out = s.schedule(0.02)
    assert out.prefill[0].job is short  # fewest tokens left goes first
    # a stream of new short requests cannot hold a long one back for ever: aging lifts it
    for step in range(3, 400):
        done = [c.job for c in out.prefill if c.last]  # each request ends with its first token
        s.update_from_output(out, ran(out, 1e-3), done, done, 0, (0, 0))
        s.add([gen(3, arrival=step * 0.05)])
        out = s.schedule(step * 0.05)
    assert all(job.prefilled == 400 for job in longs)


def test_admission_respects_the_batch_cap_and_kv_budget() -> None:
    s = Scheduler(limits(max_batch_size=2))
    jobs = [gen(10) for _ in range(4)]
    s.add(jobs)
    run_step(s, 0.0)
    assert len(s.running) == 2 and len(s.waiting) == 2
    # KV: each request may need (10 + 4) tokens x 100 bytes; a budget for 2.5 requests admits 2
    s = Scheduler(limits(kv_budget_bytes=int(2.5 * 14 * 100)))
    s.add([gen(10) for _ in range(4)])
    run_step(s, 0.0)
    assert len(s.running) == 2


def test_retry_after_follows_the_backlog() -> None:
    s = Scheduler(limits())
    s.cost.chunk_seconds_per_token = 1e-3
    assert s.retry_after() == 1
    s.add([score(20_000)])
    assert 35 <= s.retry_after() <= 45  # ~40k window inputs (stride = window / 2) at 1000 tokens/s


def test_cost_model_separates_fixed_decode_and_chunk_costs() -> None:
    cost = CostModel()
    for decode, chunk in [(0, 16), (4, 300), (32, 64), (8, 500), (1, 32), (16, 200), (2, 0), (24, 0)] * 5:
        cost.observe(StepStats(decode, chunk, 0.02 + 5e-4 * decode + 1e-4 * chunk))
    assert cost.fixed_seconds == pytest.approx(0.02, rel=1e-2)
    assert cost.decode_seconds_per_token == pytest.approx(5e-4, rel=1e-2)
    assert cost.chunk_seconds_per_token == pytest.approx(1e-4, rel=1e-2)
    assert abs(cost.budget(0.03, 16, 4096) - 300) <= 3  # 30 ms spare / 0.1 ms
    assert cost.budget(0.0001, 16, 4096) == 16  # never below the least chunk


def test_the_budget_leaves_room_for_the_running_decodes() -> None:
    s = Scheduler(limits(step_target_seconds=0.05))
    s.cost.fixed_seconds, s.cost.decode_seconds_per_token, s.cost.chunk_seconds_per_token = 0.005, 1e-3, 1e-4
    s.running = [gen(3) for _ in range(20)]
    assert abs(s.budget() - (0.05 - 0.005 - 0.020) / 1e-4) <= 1


def test_scoring_cannot_stretch_a_decoding_step_beyond_its_bound() -> None:
    s = Scheduler(limits(step_target_seconds=0.05, max_batch_size=16))
    s.cost.fixed_seconds, s.cost.decode_seconds_per_token, s.cost.chunk_seconds_per_token = 0.002, 1e-4, 1e-4
    s.add([score(100_000)])
    assert s.schedule(0.0).score_tokens == s.budget()  # nothing decodes: the whole budget
    s.running = [gen(3) for _ in range(8)]
    decode = s.cost.decode_seconds(8)  # 2.8 ms
    out = s.schedule(0.01)
    predicted = decode + out.score_tokens * s.cost.chunk_seconds_per_token
    assert out.score_tokens >= MIN_SCORE_CHUNK and predicted <= s.limits.score_stretch * decode + 1e-9
    # prompts of new generations are not held to it (their first token waits on them)
    s.add([gen(200)])
    out = s.schedule(0.02)
    assert out.prefill_tokens > out.score_tokens


@settings(max_examples=200, deadline=None)
@given(remaining=st.integers(1, 5000), room=st.integers(-10, 5000))
def test_prompts_are_never_cut_into_tiny_pieces(remaining: int, room: int) -> None:
    n = chunk_size(remaining, room)
    assert 0 <= n <= remaining
    if n:
        assert n >= MIN_CHUNK or n == remaining  # no tiny chunk unless it ends the prompt
        assert remaining - n == 0 or remaining - n >= MIN_CHUNK  # and no tiny remainder
        assert n <= max(room, 0) + MIN_CHUNK
    if remaining <= room:
        assert n == remaining  # what fits goes whole


def test_every_scoring_window_of_a_request_has_its_own_index() -> None:
    """The runner keys a window's cache row by (request, window index): indices must not repeat."""
    job = ScoreJob([list(range(n)) for n in (300, 90, 700, 2)], 128, 64, None, queue=asyncio.Queue(), loop=LOOP, index=0, timeout=1e9)
    indices = [w.index for w in job.pending]
    assert sorted(indices) == list(range(len(indices))) and len(indices) > 4
