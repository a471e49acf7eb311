"""Shared fixtures for the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# The suite's models are tiny: one intra-op thread is faster than two fighting over 2 cores with
# the servers and trainers the tests start (they inherit this through the environment).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # after OMP_NUM_THREADS on purpose

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from tests.support import save_tiny_checkpoint  # noqa: E402 - after the thread settings

# Property tests: "ci" (the default) draws the same examples on every run, so CI cannot pass or
# fail by luck; `make test-random` runs profile "random": a fresh seed (printed on failure) and
# more examples for the tests that do not fix their own count.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=10,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("random", derandomize=False, deadline=None, max_examples=100, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny calibrated CHIAR checkpoint directory (d=32, 4 layers, 2 heads, vocab 384, context 128);
    see tests.support.save_tiny_checkpoint."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint") / "chiar-tiny")
