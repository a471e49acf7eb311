"""The benchmark harness's parts: the BENCHMARKS.md writer, the peer Llama, the closed-loop client on a real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compare
from bench.load import Sample, closed_loop, closed_loop_for, completion_once, model_id
from bench.report import percentile, write_section
from loadtests.rss import RssSampler
from loadtests.server_process import ROOT, ServerProcess


def test_write_section_replaces_only_its_own_block(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "a", "first\n")
    write_section(path, "b", "other\n")
    write_section(path, "a", "second\n")
    text = path.read_text()
    assert text.startswith("# Benchmarks")
    assert "<!-- a:start -->\nsecond\n<!-- a:end -->" in text and "first" not in text
    assert "<!-- b:start -->\nother\n<!-- b:end -->" in text
    assert [p.name for p in tmp_path.iterdir()] == ["BENCHMARKS.md"]  # no temporary file left behind


def test_percentile_interpolates() -> None:
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.95) == pytest.approx(9.5)
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN


def test_a_level_too_short_to_measure_is_measured_again_longer() -> None:
    async def one(client: object, i: int) -> Sample:
        await asyncio.sleep(0.01)
        return Sample(latency=0.01, ttft=float("nan"), tokens=1)

    quick = asyncio.run(closed_loop_for("http://127.0.0.1:9", 2, 1, one, min_seconds=0.0))
    assert quick["requests"] == 2
    row = asyncio.run(closed_loop_for("http://127.0.0.1:9", 2, 1, one, min_seconds=0.3))
    assert row["requests"] > 2 * 10 and row["wall_s"] >= 0.2  # the reported pass is the longer one


def test_model_package_does_not_import_transformers() -> None:
    code = "import sys, model, bench.report; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


def test_same_size_llama_has_the_checkpoint_shapes_and_tokens(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, LlamaForCausalLM

    from bench.peers import same_size_llama

    out = same_size_llama(tiny_checkpoint, tmp_path / "llama")
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    model = LlamaForCausalLM.from_pretrained(out)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.vocab_size,
            c.max_position_embeddings) == (cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["d_ff"],
                                           cfg["vocab_size"], cfg["max_seq_len"])
    assert model.dtype.is_floating_point and str(model.dtype) == "torch.float32"
    text = "The tower is 324 metres tall ."
    ours = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")).encode(text).ids  # the checkpoint's own BOS post-processor
    assert ours[0] == cfg["bos_token_id"] and ours.count(cfg["bos_token_id"]) == 1
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == ours


def test_compare_measures_our_server_with_completions(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The peer workload against a real server: every level has requests, tokens and a peak RSS."""
    work = compare.Workload(prompts=["The city of", "In 1990 the band"], max_tokens=4, levels=[1, 2],
                            requests_per_client=2, min_requests=2)
    server = ServerProcess(tiny_checkpoint, env=compare.OUR_ENV, log_path=tmp_path / "server.log").start()
    try:
        rows = compare.measure("ours: tiny", server, work, work.levels, {"ignore_eos": True})
        rss = RssSampler(server.pid, tree=True)
        assert rss.sample() >= RssSampler(server.pid).sample() > 10  # MiB: a Python process with torch loaded
        model = asyncio.run(model_id(server.url))

        async def one(client, i):  # type: ignore[no-untyped-def]
            return await completion_once(client, model, "Hello", 3, {})

        row = asyncio.run(closed_loop(server.url, 2, 1, one))
    finally:
        server.stop()
    assert [r["clients"] for r in rows] == [1, 2]
    for r in rows:
        assert r["requests"] == 2 * r["clients"] and r["tokens_per_s"] > 0 and 1 <= r["tokens_per_request"] <= 4
        assert 0 < r["lat_p50"] <= r["lat_p95"] and r["peak_rss_mib"] > 10
    assert row["requests"] == 2 and 1 <= row["tokens_per_request"] <= 3
    lines = compare.render(compare.Comparison(rows=rows, notes=["note"]), work)
    assert "| ours: tiny | 1 | 2 |" in "\n".join(lines) and "- note" in lines


@pytest.mark.slow
def test_bench_guidellm_writes_its_section(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from bench import guidellm

    target = tmp_path / "BENCHMARKS.md"
    code = guidellm.main(["--checkpoint", str(tiny_checkpoint), "--concurrency", "2", "--requests", "4", "--prompt-tokens", "16",
                          "--output-tokens", "8", "--write", str(target)])
    assert code == 0  # every guidellm request succeeded
    section = target.read_text().split(f"<!-- {guidellm.SECTION}:start -->")[1].split(f"<!-- {guidellm.SECTION}:end -->")[0]
    rows = [line for line in section.splitlines() if line.startswith(("| completions", "| chat"))]
    assert [row.split(" | ")[:4] for row in rows] == [["| completions", "2", "4", "0"], ["| chat", "2", "4", "0"]]
    for row in rows:  # guidellm's and the server's figures, all measured
        assert "-" not in [cell.strip() for cell in row.strip("|").split("|")][6:]


@pytest.mark.slow
def test_bench_prefix_writes_its_section(tiny_checkpoint: Path, tiny_baseline: Path, tmp_path: Path) -> None:
    """`make bench-prefix` at smoke sizes: every part runs against real servers and its figures land in the section."""
    from bench import prefix

    target = tmp_path / "BENCHMARKS.md"
    assert prefix.main(["--quick", "--chiar", str(tiny_checkpoint), "--baseline", str(tiny_baseline), "--write", str(target)]) == 0
    section = target.read_text().split(f"<!-- {prefix.SECTION}:start -->")[1].split(f"<!-- {prefix.SECTION}:end -->")[0]
    assert "every log-likelihood identical (bit for bit): yes" in section and "accuracy identical: yes" in section
    load = next(line for line in section.splitlines() if line.startswith("| 9 |"))  # the mixed load's row
    assert load.split(" | ")[1:3] == ["0", "0"]  # no request failed, none for the budget
    assert "| share |" in section and "| copy |" in section and "nan" not in section


def test_bench_step_writes_its_section(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`make bench-step` end to end on a tiny checkpoint: the step table, the op counts and the commit."""
    out = tmp_path / "BENCH.md"
    out.write_text("<!-- bench-step:start -->\nold\n<!-- bench-step:end -->\n")
    result = subprocess.run([sys.executable, "-m", "bench.step_profile", "--checkpoint", str(tiny_checkpoint), "--steps", "2",
                             "--batches", "1", "2", "--decode-threads", "--write", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert "old" not in text and "| step total |" in text and "aten ops in one decode forward" in text
    assert "### After (commit " in text and "batch 2: ms (share)" in text
