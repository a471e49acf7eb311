"""Checkpoint loading, issue 23 part 3: non-finite weights, the rotary table at a long context, and the HF
tokenizer files, each refused (or loaded) with one line naming the file and the problem."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import CheckpointError, load_checkpoint, save_checkpoint
from model.attention import EAGER_POSITIONS, RotaryEmbedding
from tests.model.helpers import make_model, tiny_config
from tests.support import REPO
from training.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog " * 20], vocab_size=280)
    model = make_model(tiny_config(vocab_size=280, weights_dtype="bfloat16"), seed=2).float()
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("limits") / "ckpt")


@pytest.fixture()
def copy(saved: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(saved, tmp_path / "copy"))


def problem(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def rewrite_tensor(path: Path, change) -> str:
    weights = path / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    name = sorted(tensors)[1]
    change(tensors[name].view(-1))
    save_file(tensors, str(weights), metadata=metadata)
    return name


@pytest.mark.parametrize("poison, counts", [(lambda t: t.view(torch.uint8).fill_(0xFF), "NaN and 0 infinite"),
                                            (lambda t: t.__setitem__(3, float("inf")), "0 NaN and 1 infinite"),
                                            (lambda t: t.__setitem__(0, float("nan")), "1 NaN and 0 infinite")])
def test_non_finite_weights_are_refused_naming_the_tensor(copy: Path, poison, counts: str) -> None:
    name = rewrite_tensor(copy, poison)
    message = problem(copy)
    assert message.startswith(f"{copy / 'model.safetensors'}: non-finite weights in {name}: "), message
    assert counts in message


TOKENIZER_FILES = [
    ("tokenizer_config.json", pickle.dumps({"chat_template": "x"}), "invalid JSON: not UTF-8 text (byte 0)"),
    ("tokenizer_config.json", b"{nope", "invalid JSON: Expecting property name"),
    ("tokenizer_config.json", b"[]", "invalid JSON shape: must be an object, got list"),
    ("tokenizer_config.json", b'{"chat_template": 7}', "invalid JSON shape: chat_template: must be a string"),
    ("tokenizer_config.json", b'{"bos_token": ["<bos>"]}', "invalid JSON shape: bos_token: must be a string"),
    ("tokenizer_config.json", b'{"model_max_length": "2047"}', "invalid JSON shape: model_max_length: must be a number"),
    ("tokenizer_config.json", b'{"add_bos_token": 1}', "invalid JSON shape: add_bos_token: must be true or false"),
    ("special_tokens_map.json", pickle.dumps(["<bos>"]), "invalid JSON: not UTF-8 text (byte 0)"),
    ("special_tokens_map.json", b'"<bos>"', "invalid JSON shape: must be an object, got str"),
    ("special_tokens_map.json", b'{"eos_token": 2}', "invalid JSON shape: eos_token: must be a string"),
    ("tokenizer.json", pickle.dumps({"model": 1}), "cannot load tokenizer: 'utf-8' codec can't decode"),
    ("tokenizer.json", b"{}", "cannot load tokenizer: "),
]


@pytest.mark.parametrize("name, content, expected", TOKENIZER_FILES)
def test_tokenizer_files_that_are_not_json_of_the_expected_shape(copy: Path, name: str, content: bytes, expected: str) -> None:
    (copy / name).write_bytes(content)
    assert problem(copy).startswith(f"{copy / name}: {expected}")


def test_tokenizer_file_that_is_not_a_regular_file(copy: Path) -> None:
    (copy / "tokenizer_config.json").unlink()
    os.mkfifo(copy / "tokenizer_config.json")  # opening it would block: it must not be opened
    assert problem(copy) == f"{copy / 'tokenizer_config.json'}: not a regular file (a FIFO, device or directory)"
    (copy / "tokenizer_config.json").unlink()
    (copy / "special_tokens_map.json").unlink()
    (copy / "special_tokens_map.json").symlink_to(copy / "nowhere")
    assert problem(copy) == f"{copy / 'special_tokens_map.json'}: dangling or looping symlink"
    (copy / "special_tokens_map.json").unlink()
    load_checkpoint(copy)  # both files are optional


def test_rotary_tables_grow_on_demand_to_the_eager_values() -> None:
    lazy = RotaryEmbedding(8, 2**20, 10000.0)
    assert lazy.cos.shape == (EAGER_POSITIONS, 8)
    x = torch.randn(1, 2, 8, dtype=torch.float64)
    positions = torch.tensor([[7, EAGER_POSITIONS + 5000]])
    y = lazy.to(torch.float64)(x, positions)
    assert lazy.cos.shape == (2 * EAGER_POSITIONS, 8)  # the next power of two holding the position
    eager = torch.outer(torch.arange(2 * EAGER_POSITIONS, dtype=torch.float64),
                        1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)))
    eager = torch.cat([eager, eager], dim=-1)
    assert torch.equal(lazy.cos, eager.cos()) and torch.equal(lazy.sin, eager.sin())
    half = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
    assert torch.equal(y, x * eager.cos()[positions] + half * eager.sin()[positions])
    short = RotaryEmbedding(8, 100, 10000.0)  # a context within the eager rows: built whole, never grown
    assert short.cos.shape == (100, 8) and torch.equal(short.cos, eager[:100].cos().float())


def test_documented_maximum_context_loads_without_its_whole_rotary_table(copy: Path, tmp_path: Path) -> None:
    """max_seq_len 2^20 used to allocate the 1.8 GB table (and its float64 angles) at load; a child process
    reports what loading it added to its peak RSS, and the model still runs."""
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "max_seq_len": 2**20}))
    script = ("import sys, torch\nfrom model import load_checkpoint\n"
              "def hwm(): return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]) // 1024\n"
              "before = hwm(); model, _ = load_checkpoint(sys.argv[1]); after = hwm()\n"
              "model.infer(torch.tensor([[1, 5, 9]]))\nprint(after - before, model.rope.cos.shape[0])\n")
    out = subprocess.run([sys.executable, "-c", script, str(copy)], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    added_mb, rows = map(int, out.stdout.split())
    assert rows == EAGER_POSITIONS and added_mb < 300, out.stdout


def test_rotary_tables_over_their_budget_are_refused_before_allocation(copy: Path) -> None:
    """2^20 positions x head_dim 256 x 8 bytes (cos + sin, float32) = 2 GiB, over the documented 1 GiB: refused
    from the config alone, before the weights are read."""
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "max_seq_len": 2**20, "d_model": 256, "n_heads": 1}))
    assert problem(copy) == (f"{copy / 'config.json'}: max_seq_len: 1048576 x head_dim 256 needs 2147483648 bytes of rotary "
                             "tables, over the documented maximum 1073741824")
