"""EleutherAI lm-evaluation-harness (`local-completions`) against the real server, on two tasks built here.

No hand-made tokenizer: the first run lets lm-eval detect the server's /tokenizer_info + /tokenize (its
remote tokenizer), the second loads the checkpoint directory with AutoTokenizer (model.hf_tokenizer files).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from model.hf_tokenizer import write_tokenizer_files
from tests.server.conftest import ServerProcess
from tests.support import REPO

DOCS = [
    "The history of the city begins in the Roman period, when a fort stood by the river.",
    "A river runs through the valley and the town grew on both banks.",
    "He played for the club for three seasons before he retired in 1998.",
    "Café owners in the old quarter said the new road would bring visitors.",
]
MC = [
    {"question": "The river runs through the", "choices": ["valley", "seasons", "banks of stars"], "answer": 0},
    {"question": "He played for the", "choices": ["club", "river"], "answer": 0},
    {"question": "The town grew on both", "choices": ["banks", "seasons", "forts"], "answer": 0},
]


def write_tasks(root: Path) -> None:
    """Two lm-eval task configs over local JSONL files (no download)."""
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC))
    common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
    (root / "chiar_rolling.yaml").write_text(
        "task: chiar_rolling\n" + common.format(path=root / "docs.jsonl")
        + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        + "metric_list:\n  - metric: bits_per_byte\n  - metric: word_perplexity\n")
    (root / "chiar_mc.yaml").write_text(
        "task: chiar_mc\n" + common.format(path=root / "mc.jsonl")
        + 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        + "metric_list:\n  - metric: acc\n    higher_is_better: true\n")


def readme_lm_eval() -> str:
    """The README's lm-eval block (max_length from /v1/models, then lm_eval run), as one bash script."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if "lm_eval run" in b]
    return block


def replaced(text: str, old: str, new: str) -> str:
    assert old in text, f"README's lm-eval command no longer has {old!r}"
    return text.replace(old, new)


def run_lm_eval(server: ServerProcess, root: Path, tasks: str, out: Path, extra: str = "") -> dict:
    """README's command as it stands, pointed at the test server, its model id and the local tasks."""
    script = replaced(readme_lm_eval(), "127.0.0.1:8000", server.url.removeprefix("http://"))
    script = replaced(script, "model=chiar-small", "model=chiar-tiny")
    script = replaced(script, "--tasks wikitext", f"--tasks {tasks} --include_path {root} --output_path {out} --log_samples")
    script = replaced(script, "max_length=$MAX_MODEL_LEN", "max_length=$MAX_MODEL_LEN" + extra)
    # lm_eval and python3 from this venv, as `pip install` puts them on a user's PATH; no network, no downloads
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf")}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = {task: [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
               for task in tasks.split(",")}
    return {"results": results["results"], "samples": samples}


def server_bits_per_byte(client: httpx.Client) -> float:
    results = client.post("/v1/perplexity", json={"text": DOCS}).json()["results"]
    return sum(r["nll"] for r in results) / (math.log(2) * sum(r["bytes"] for r in results))


def echo_loglikelihood(client: httpx.Client, context: str, continuation: str) -> float:
    """log p(continuation | context) from the server's echo logprobs (lm-eval's token split)."""
    def ids(text: str) -> list[int]:
        return client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]

    whole, ctx = ids(context + continuation), ids(context)
    body = {"model": "chiar-tiny", "prompt": whole, "max_tokens": 0, "echo": True, "logprobs": 0}
    lps = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert len(lps) == len(whole)
    return sum(lps[len(ctx):])


def test_readme_takes_max_length_from_the_server() -> None:
    script = readme_lm_eval()
    assert "/v1/models" in script and "max_model_len" in script and "max_length=$MAX_MODEL_LEN" in script
    assert not re.search(r"max_length=\d", script)  # no number that goes stale when the context changes


@pytest.mark.slow
def test_lm_eval_local_completions(server: ServerProcess, tmp_path: Path, tiny_checkpoint: Path) -> None:
    write_tasks(tmp_path)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        run = run_lm_eval(server, tmp_path, "chiar_rolling,chiar_mc", tmp_path / "out-remote")
        expected_bpb = server_bits_per_byte(client)
        assert run["results"]["chiar_rolling"]["bits_per_byte,none"] == pytest.approx(expected_bpb, rel=1e-4)
        correct = []
        for sample in run["samples"]["chiar_mc"]:
            doc = sample["doc"]
            got = [float(ll) for ll, _ in sample["filtered_resps"]]
            want = [echo_loglikelihood(client, doc["question"], " " + choice) for choice in doc["choices"]]
            assert got == pytest.approx(want, abs=1e-4)
            correct.append(float(max(range(len(want)), key=want.__getitem__) == doc["answer"]))
        assert run["results"]["chiar_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
        # the same with the checkpoint's own Hugging Face tokenizer files
        tokenizer_dir = tmp_path / "checkpoint"
        shutil.copytree(tiny_checkpoint, tokenizer_dir)
        write_tokenizer_files(tokenizer_dir)
        hf = run_lm_eval(server, tmp_path, "chiar_rolling", tmp_path / "out-hf",
                         extra=f",tokenizer_backend=huggingface,tokenizer={tokenizer_dir}")
        assert hf["results"]["chiar_rolling"]["bits_per_byte,none"] == pytest.approx(expected_bpb, rel=1e-4)
