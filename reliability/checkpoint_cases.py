"""The 76 tampered checkpoints of the tampered-checkpoints probe: each case edits a copy of a real checkpoint.

`EXPECTED_TO_LOAD` names the cases that are no fault of the file's format: safetensors has no checksum
(a bit flip in tensor data that stays finite is a valid, different model), an unused config field, and
max_seq_len at its documented maximum (it must load without allocating its whole rotary table).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
from collections.abc import Callable
from pathlib import Path

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
TOKENIZER_CONFIG, SPECIAL_TOKENS = "tokenizer_config.json", "special_tokens_map.json"
MAX_SEQ_LEN = 2**20  # model/checkpoint_guard.py Limits.max_seq_len
Edit = Callable[[Path], None]


class _Pickled:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch /tmp/chiar-pickle-was-executed",))


def _edit_json(name: str, **changes: object) -> Edit:
    def edit(d: Path) -> None:
        data = json.loads((d / name).read_text())
        data.update(changes)
        if "n_layers" in changes:
            data.update(thresholds=None, bands=None)
        (d / name).write_text(json.dumps(data))
    return edit


def _write(name: str, data: bytes | str) -> Edit:
    def edit(d: Path) -> None:
        (d / name).unlink(missing_ok=True)
        (d / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return edit


def _replace(name: str, make: Callable[[Path], None]) -> Edit:
    def edit(d: Path) -> None:
        (d / name).unlink(missing_ok=True)
        make(d / name)
    return edit


def _truncate(keep: int) -> Edit:
    def edit(d: Path) -> None:
        data = (d / WEIGHTS).read_bytes()
        (d / WEIGHTS).write_bytes(data[:keep])  # negative: cut the tail
    return edit


def _flip(where: str, seed: int) -> Edit:
    def edit(d: Path) -> None:
        data = bytearray((d / WEIGHTS).read_bytes())
        header_len = int.from_bytes(data[:8], "little")
        rng = random.Random(seed)
        lo, hi = (0, 8 + header_len) if where == "header" else (8 + header_len, len(data))
        for _ in range(4):
            data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
        (d / WEIGHTS).write_bytes(bytes(data))
    return edit


def _tensors(change: Callable[[dict], None], metadata: dict[str, str] | None = None) -> Edit:
    """Load the tensors, change them, save them back (metadata kept unless given)."""
    def edit(d: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(d / WEIGHTS), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            kept = f.metadata()
        change(tensors)
        save_file(tensors, str(d / WEIGHTS), metadata=metadata or kept)
    return edit


def _poison(value: float, everywhere: bool) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        name = sorted(tensors)[len(tensors) // 2]
        flat = tensors[name].view(-1)
        if everywhere:  # every byte 0xFF: NaN in bf16, float16 and float32 alike
            flat.view(dtype=__import__("torch").uint8).fill_(0xFF)
        else:
            flat[flat.numel() // 3] = value
    return change


def _header(change: Callable[[dict], None]) -> Edit:
    """Rewrite the safetensors header in place (data untouched)."""
    def edit(d: Path) -> None:
        data = (d / WEIGHTS).read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        change(header)
        raw = json.dumps(header).encode()
        (d / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return edit


def _weights_cases() -> dict[str, Edit]:
    out: dict[str, Edit] = {}
    for keep in (0, 7, 8, 100, -1, -4096):
        out[f"truncated weights ({keep} bytes kept)" if keep >= 0 else f"truncated weights (last {-keep} bytes cut)"] = _truncate(keep)
    for seed in range(3):
        out[f"flipped header bits (seed {seed})"] = _flip("header", seed)
        out[f"flipped tensor-data bits (seed {seed})"] = _flip("data", seed)
    out["wrong tensor shape"] = _tensors(lambda t: t.update({(n := sorted(t)[-1]): t[n].flatten()[:-1].clone()}))
    out["one tensor missing"] = _tensors(lambda t: t.pop(sorted(t)[0]))
    out["one tensor too many"] = _tensors(lambda t: t.update(extra=t[sorted(t)[0]].clone()))
    out["weights all NaN in one tensor (every byte 0xFF)"] = _tensors(_poison(float("nan"), everywhere=True))
    out["one NaN weight"] = _tensors(_poison(float("nan"), everywhere=False))
    out["one infinite weight"] = _tensors(_poison(float("inf"), everywhere=False))
    out["unknown format version"] = _tensors(lambda t: None, {"format_version": "2", "arch": "chiar"})
    out["arch metadata does not match"] = _tensors(lambda t: None, {"format_version": "1", "arch": "llama"})
    out["header dtype changed"] = _header(lambda h: h[sorted(k for k in h if k != "__metadata__")[0]].update(dtype="F64"))
    out["header offsets past the end"] = _header(lambda h: h[sorted(k for k in h if k != "__metadata__")[-1]].update(
        data_offsets=[2**40, 2**40 + 4]))
    out["pickle payload as weights"] = _write(WEIGHTS, pickle.dumps(_Pickled()))
    out["symlink loop as weights"] = _replace(WEIGHTS, lambda p: p.symlink_to(p))
    out["weights symlinked to /dev/zero"] = _replace(WEIGHTS, lambda p: p.symlink_to("/dev/zero"))
    out["directory as weights"] = _replace(WEIGHTS, lambda p: p.mkdir())
    return out


def _config_cases() -> dict[str, Edit]:
    out: dict[str, Edit] = {}
    out["config d_ff does not match"] = _edit_json(CONFIG, d_ff=48)
    out["config operators do not match"] = _edit_json(CONFIG, operators=["dct", "rbf", "attn"], rbf_centers=7)
    out["config rbf_centers changed"] = _edit_json(CONFIG, rbf_centers=7)  # unused (loads) unless the model has RBF layers
    for field, value in (("n_layers", 10**4), ("d_model", 10**6), ("vocab_size", 10**9), ("max_seq_len", 10**9),
                         ("d_ff", 10**8), ("n_layers", 300)):
        out[f"absurd {field}={value}"] = _edit_json(CONFIG, **{field: value})
    out[f"max_seq_len at its documented maximum ({MAX_SEQ_LEN})"] = _edit_json(CONFIG, max_seq_len=MAX_SEQ_LEN)
    out["max_seq_len maximum with head_dim 1024 (rotary tables over budget)"] = _edit_json(CONFIG, max_seq_len=MAX_SEQ_LEN,
                                                                                           d_model=1024, n_heads=1)
    out["d_model as a string"] = _edit_json(CONFIG, d_model="256")
    out["n_heads not dividing d_model"] = _edit_json(CONFIG, n_heads=7)
    out["rope_theta NaN"] = _edit_json(CONFIG, rope_theta=float("nan"))
    out["vocab_size below the tokenizer's"] = _edit_json(CONFIG, vocab_size=300)
    out["config is not JSON"] = _write(CONFIG, "{nope")
    out["config is a JSON list"] = _write(CONFIG, "[]")
    out["config nested 100000 deep"] = _write(CONFIG, "[" * 100_000 + "]" * 100_000)
    out["pickle payload as config"] = _write(CONFIG, pickle.dumps(_Pickled()))
    return out


def _tokenizer_cases() -> dict[str, Edit]:
    out: dict[str, Edit] = {}
    out["tokenizer is garbage"] = _write(TOKENIZER, b"\x00\xff" * 100)
    out["tokenizer is empty"] = _write(TOKENIZER, "")
    out["tokenizer is an empty JSON object"] = _write(TOKENIZER, "{}")
    out["tokenizer nested 100000 deep"] = _write(TOKENIZER, "[" * 100_000 + "]" * 100_000)
    out["pickle payload as tokenizer"] = _write(TOKENIZER, pickle.dumps(_Pickled()))
    out["pickle payload as tokenizer_config.json"] = _write(TOKENIZER_CONFIG, pickle.dumps(_Pickled()))
    out["pickle payload as special_tokens_map.json"] = _write(SPECIAL_TOKENS, pickle.dumps(_Pickled()))
    out["tokenizer_config.json is not JSON"] = _write(TOKENIZER_CONFIG, "{nope")
    out["tokenizer_config.json is a JSON list"] = _write(TOKENIZER_CONFIG, "[]")
    out["tokenizer_config.json is not UTF-8"] = _write(TOKENIZER_CONFIG, b'{"chat_template": "\xff"}')
    out["tokenizer_config.json chat_template is a number"] = _edit_json(TOKENIZER_CONFIG, chat_template=7)
    out["tokenizer_config.json bos_token is a list"] = _edit_json(TOKENIZER_CONFIG, bos_token=["<bos>"])
    out["tokenizer_config.json model_max_length is text"] = _edit_json(TOKENIZER_CONFIG, model_max_length="2047")
    out["tokenizer_config.json over 16 MiB"] = _write(TOKENIZER_CONFIG, '{"chat_template": "' + "x" * (2**24 + 1) + '"}')
    out["special_tokens_map.json is a JSON string"] = _write(SPECIAL_TOKENS, '"<bos>"')
    out["special_tokens_map.json token is a number"] = _edit_json(SPECIAL_TOKENS, eos_token=2)
    out["directory as tokenizer_config.json"] = _replace(TOKENIZER_CONFIG, lambda p: p.mkdir())
    out["tokenizer_config.json symlinked to /dev/zero"] = _replace(TOKENIZER_CONFIG, lambda p: p.symlink_to("/dev/zero"))
    for name in (WEIGHTS, CONFIG, TOKENIZER, TOKENIZER_CONFIG, SPECIAL_TOKENS):
        out[f"FIFO as {name}"] = _replace(name, lambda p: os.mkfifo(p))
        out[f"dangling symlink as {name}"] = _replace(name, lambda p: p.symlink_to(p.parent / "nowhere"))
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        out[f"missing {name}"] = lambda d, name=name: (d / name).unlink()
    return out


def cases() -> dict[str, Edit]:
    """Every tampering, by name."""
    return {**_weights_cases(), **_config_cases(), **_tokenizer_cases()}


def expected_to_load(name: str, operators: list[str]) -> bool:
    """Cases that load by design (see the module docstring)."""
    return ("tensor-data bits" in name or name.startswith("max_seq_len at its documented maximum")
            or (name == "config rbf_centers changed" and "rbf" not in operators))
