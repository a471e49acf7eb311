"""HF-loadable tokenizer files and the vLLM-style /tokenize, /detokenize, /tokenizer_info against a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from model.hf_tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    LEGACY_DEFAULT_CHAT_TEMPLATE,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    stale_files,
)
from tests.support import REPO, ServerProcess

TEXTS = ["The history of the city begins", "Café, naïve — 日本語 🙂", "  two  spaces\nand a newline", ""]


def legacy_copy(checkpoint: Path, path: Path) -> Path:
    """`checkpoint` as the files were before the BOS fix: no post-processor, add_bos_token false, old template."""
    shutil.copytree(checkpoint, path)
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    tokenizer["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((path / TOKENIZER_CONFIG).read_text())
    config.update(add_bos_token=False, chat_template=LEGACY_DEFAULT_CHAT_TEMPLATE)
    (path / TOKENIZER_CONFIG).write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def hf_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An old-style copy of the tiny checkpoint upgraded by the documented one-line command."""
    path = legacy_copy(tiny_checkpoint, tmp_path_factory.mktemp("hf") / "chiar-tiny")
    assert stale_files(path) == ["tokenizer.json", TOKENIZER_CONFIG]
    proc = subprocess.run([sys.executable, "-m", "model.hf_tokenizer", str(path)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert stale_files(path) == []
    return path


def test_upgrade_command_is_idempotent_and_keeps_a_custom_template(hf_dir: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = json.loads((hf_dir / TOKENIZER_CONFIG).read_text())
    assert config["chat_template"] == DEFAULT_CHAT_TEMPLATE and config["add_bos_token"] is True
    assert json.loads((hf_dir / SPECIAL_TOKENS_MAP).read_text()) == {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    # what save_checkpoint wrote and what the upgrade wrote are the same files
    for name in ("tokenizer.json", TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        assert json.loads((hf_dir / name).read_text()) == json.loads((tiny_checkpoint / name).read_text()), name
    copy = tmp_path / "ck"
    shutil.copytree(hf_dir, copy)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    for args in (["--chat-template", str(template)], []):  # the second run keeps what the first stored
        assert subprocess.run([sys.executable, "-m", "model.hf_tokenizer", str(copy), *args], cwd=REPO).returncode == 0
        assert json.loads((copy / TOKENIZER_CONFIG).read_text())["chat_template"] == template.read_text()
    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    assert tokenizer["post_processor"] == json.loads((hf_dir / "tokenizer.json").read_text())["post_processor"]  # not doubled
    (copy / "config.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "model.hf_tokenizer", str(copy)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and "config.json: missing file" in proc.stderr


def test_demo_checkpoints_ship_hf_files() -> None:
    for name in ("chiar-small", "baseline-small"):
        assert stale_files(REPO / "checkpoints" / name) == [], name
        tok = AutoTokenizer.from_pretrained(REPO / "checkpoints" / name)
        config = json.loads((REPO / "checkpoints" / name / "config.json").read_text())
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (config["bos_token_id"], config["eos_token_id"],
                                                                          config["pad_token_id"])
        assert tok.model_max_length == config["max_seq_len"] - 1
        assert tok("The tower").input_ids[0] == config["bos_token_id"]


def test_auto_tokenizer_gives_the_server_ids(hf_dir: Path, client: httpx.Client) -> None:
    tok = AutoTokenizer.from_pretrained(hf_dir)  # default arguments everywhere below
    info = client.get("/tokenizer_info").json()
    files = json.loads((hf_dir / TOKENIZER_CONFIG).read_text())
    shared = {k: v for k, v in info.items() if k in files}
    assert shared == {k: files[k] for k in shared} and len(shared) == 8, shared  # the settings the files hold
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (info["bos_token"], info["eos_token"], info["pad_token"])
    assert tok.bos_token_id == info["bos_token_id"] == 1
    assert tok.chat_template == info["chat_template"]
    assert tok.model_max_length == info["model_max_length"]
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids == client.post("/tokenize", json={"prompt": text}).json()["tokens"], text
        assert ids == client.post("/v1/tokenize", json={"text": text}).json()["token_ids"], text
        assert ids[0] == 1 and tok.encode(text, add_special_tokens=False) == ids[1:]
        vllm = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
        assert vllm == ids[1:]
        assert client.post("/detokenize", json={"tokens": ids[1:]}).json()["prompt"] == tok.decode(ids[1:]) == text
    for messages in ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                     [{"role": "user", "content": "Tell me about the city."}, {"role": "assistant", "content": "It is old."},
                      {"role": "user", "content": "How old?"}]):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert ids == client.post("/tokenize", json={"messages": messages}).json()["tokens"]
        assert ids[0] == 1 and ids.count(1) == 1


def test_a_served_old_checkpoint_says_how_to_upgrade(tiny_checkpoint: Path, tmp_path: Path) -> None:
    old = legacy_copy(tiny_checkpoint, tmp_path / "old")
    server = ServerProcess(old, tmp_path / "server.log").start()
    try:
        info = httpx.get(server.url + "/tokenizer_info", timeout=10).json()
        assert info["add_bos_token"] is True and info["chat_template"] == DEFAULT_CHAT_TEMPLATE  # what the upgrade writes
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "tokenizer.json, tokenizer_config.json out of date" in log and f"python -m model.hf_tokenizer {old}" in log


def test_tokenize_special_tokens_follow_vllm(client: httpx.Client) -> None:
    # /tokenize maps special-token strings to their ids like vLLM/HF; generation prompts never do
    assert client.post("/tokenize", json={"prompt": "<bos>", "add_special_tokens": False}).json()["tokens"] == [1]
    assert 2 not in client.post("/v1/tokenize", json={"text": "<eos>"}).json()["token_ids"]
    r = client.post("/tokenize", json={"prompt": "a b", "return_token_strs": True}).json()
    assert r["token_strs"][0] == "<bos>" and r["count"] == len(r["tokens"]) == len(r["token_strs"])


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": 1}, "add_special_tokens"),
    ("/tokenize", {"prompt": "x", "bogus": 1}, "bogus"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {}, "prompt"),
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
    ("/detokenize", {"tokens": [True]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
])
def test_tokenizer_endpoints_reject_bad_input(client: httpx.Client, path: str, body: dict, param: str) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"].startswith(param)


def test_tokenize_invalid_json_is_400(client: httpx.Client) -> None:
    r = client.post("/tokenize", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
