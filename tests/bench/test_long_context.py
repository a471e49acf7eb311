"""The long-context benchmarks run tiny, on real server processes: KV capacity (bench.kv_capacity) and
bench.server's long-prompt rows; their output has the structure BENCHMARKS.md gets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer

from bench.longtext import long_texts
from loadtests.server_process import ROOT


def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_long_texts_have_the_asked_token_count(tiny_checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    texts = long_texts(tiny_checkpoint, 100, 3)
    assert len(set(texts)) == 3
    assert [len(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts] == [100, 100, 100]


def test_kv_capacity_reports_both_models_under_one_budget(tiny_checkpoint: Path, tiny_baseline: Path, tmp_path: Path) -> None:
    out, md = tmp_path / "kv.json", tmp_path / "BENCHMARKS.md"
    run("bench.kv_capacity", "--chiar", str(tiny_checkpoint), "--baseline", str(tiny_baseline), "--fit", "2",
        "--requests", "6", "--prompt-tokens", "60", "--new-tokens", "40", "--threads", "1", "--json", str(out), "--write", str(md))
    rows = {r["model"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"CHIAR", "baseline"}
    for r in rows.values():
        assert r["ok"] == r["requests"] == 6
        # 40 decode steps keep the lone request in the cache long enough for the 20 ms poller to see it
        assert r["prompt_tokens"] == 60 and r["new_tokens"] == 40
        assert r["seq_kv_bytes"] > 0 and 0 < r["peak_used_bytes"] <= r["budget_bytes"]
        assert 1 <= r["peak_running"] <= 6
    assert rows["CHIAR"]["budget_bytes"] == rows["baseline"]["budget_bytes"]
    assert rows["CHIAR"]["seq_kv_bytes"] < rows["baseline"]["seq_kv_bytes"]  # routed: fewer cache entries
    assert rows["baseline"]["peak_running"] <= 2  # the budget fits two full-attention sequences
    text = md.read_text()
    assert "<!-- bench-kv:start -->" in text and "| CHIAR |" in text and "CHIAR / baseline" in text


def test_server_long_rows_put_both_models_side_by_side(tiny_checkpoint: Path, tiny_baseline: Path, tmp_path: Path) -> None:
    out, md = tmp_path / "long.json", tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n<!-- bench-server:start -->\nkept\n<!-- bench-server:end -->\n")
    run("bench.server", "--chiar", str(tiny_checkpoint), "--baseline", str(tiny_baseline), "--long-only",
        "--long-lengths", "40", "90", "--long-clients", "2", "--long-requests", "2", "--long-new-tokens", "6",
        "--threads", "1", "--json", str(out), "--write", str(md))
    rows = json.loads(out.read_text())["long"]
    keys = {(r["model"], r["workload"], r["prompt_tokens"], r["clients"]) for r in rows}
    assert keys == {(m, w, n, c) for m in ("CHIAR", "baseline") for w in ("perplexity", "generate") for n in (40, 90) for c in (2,)}
    for r in rows:
        assert r["requests"] == 2 and r["tokens_per_s"] > 0
        if r["workload"] == "perplexity":
            assert r["tokens_per_request"] == r["prompt_tokens"]  # every token after BOS is scored
        else:
            assert r["tokens_per_request"] == 6 and r["ttft_p50"] > 0 and r["itl_p50"] > 0
    text = md.read_text()
    assert "<!-- bench-server:start -->\nkept\n" in text  # --long-only leaves the other rows' section alone
    section = text.split("<!-- bench-server-long:start -->")[1]
    assert section.count("| 90 | ") == 2 and "long-document scoring, CHIAR / baseline" in section
