"""`make bench-gpu` on a machine without CUDA: one clear line, the CPU parts run, BENCHMARKS.md untouched.
(On a CUDA machine the same command runs the cuda parts; tests/model/test_precision.py holds the model checks.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu import NO_CUDA, block_times
from loadtests.server_process import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path; a CUDA machine runs the cuda path instead")
def test_without_cuda_it_says_so_and_runs_the_cpu_parts(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--quick", "--skip-tests", "--seqs", "48", "--write", str(md)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == NO_CUDA
    assert any(line.startswith("cpu float32 seq=48: routed layer ") for line in lines)
    assert md.read_text() == "# Benchmarks\n"


def test_block_times_covers_every_block_and_restores_the_model() -> None:
    from model import ChiarConfig, ChiarLM

    model = ChiarLM(ChiarConfig(vocab_size=64, d_model=16, n_layers=4, n_heads=2, d_ff=32, max_seq_len=32)).eval()
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(0))
    per_block, whole = block_times(model, ids, repeats=2)
    assert sorted(per_block) == [0, 1, 2, 3] and all(ms > 0 for ms in per_block.values())
    assert whole >= sum(per_block.values())
    assert all("forward_step" not in vars(block) for block in model.blocks)  # the timing wrappers are gone
    assert getattr(model.kernels, "whole_step", True)  # the native whole-forward call is back on


def test_the_server_smoke_test_passes_on_a_real_server(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The smoke test's own checks, run against a CPU server (bench-gpu runs it with --device cuda)."""
    from bench.gpu import server_smoke

    ok, detail = server_smoke(tiny_checkpoint, tmp_path, device="cpu")
    assert ok, detail
    assert "forward latency recorded for device=cpu" in detail
