import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import CheckpointError, ChiarLM, load_checkpoint, save_checkpoint
from model.checkpoint import FORMAT_VERSION
from model.hf_tokenizer import stale_files
from tests.model.helpers import make_model, tiny_config
from tests.support import REPO
from training.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["the quick brown fox jumps over the lazy dog " * 20], vocab_size=280)


@pytest.fixture()
def saved(tmp_path: Path, tokenizer) -> tuple[ChiarLM, Path]:
    model = make_model(tiny_config(vocab_size=280, routing="soft", operators=("dct", "rbf", "attention")), seed=2).float()
    return model, save_checkpoint(model, tokenizer, tmp_path / "ckpt")


def test_round_trip_is_bit_exact(saved, tokenizer) -> None:
    model, path = saved
    loaded, tok = load_checkpoint(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "special_tokens_map.json",
                                                      "tokenizer.json", "tokenizer_config.json"]
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.embed.weight  # tying survives the round trip
    # the saved tokenizer puts BOS first by default, as the server does (model.hf_tokenizer)
    assert tok.encode("lazy dog").ids == [1, *tokenizer.encode("lazy dog").ids]
    assert tok.encode("lazy dog", add_special_tokens=False).ids == tokenizer.encode("lazy dog").ids
    assert stale_files(path) == []
    assert loaded.config.thresholds == model.routing_thresholds()
    ids = torch.randint(0, 280, (2, 9))
    assert torch.equal(model.eval().infer(ids).logits, loaded.infer(ids).logits)
    assert load_file(str(path / "model.safetensors")).keys()  # plain safetensors, readable by anyone


def test_bf16_storage_round_trip(tmp_path: Path, tokenizer) -> None:
    model = ChiarLM(tiny_config(vocab_size=280, weights_dtype="bfloat16"))
    path = save_checkpoint(model, tokenizer, tmp_path / "bf16")
    loaded, _ = load_checkpoint(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor.bfloat16().float(), loaded.state_dict()[name]), name
    again = save_checkpoint(loaded, tokenizer, tmp_path / "bf16-again")
    first, second = load_file(str(path / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _problem(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    return str(info.value)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file(saved, name: str) -> None:
    _, path = saved
    (path / name).unlink()
    assert _problem(path) == f"{path / name}: missing file"


def test_missing_directory(tmp_path: Path) -> None:
    assert "does not exist" in _problem(tmp_path / "nope")


@pytest.mark.parametrize("keep", [0, 5, 100, -10])
def test_truncated_weights(saved, keep: int) -> None:
    _, path = saved
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])  # negative: drop the last bytes of the tensor data
    message = _problem(path)
    assert message.startswith(str(weights)) and ("truncated" in message or "corrupt" in message)


def test_corrupt_header(saved) -> None:
    _, path = saved
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff\xfe garbl"
    weights.write_bytes(bytes(data))
    assert "corrupt" in _problem(path)


def _rewrite(path: Path, mutate, metadata: dict | None = None) -> None:
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    mutate(tensors)
    save_file(tensors, str(weights), metadata=metadata or {"format_version": FORMAT_VERSION, "arch": "chiar"})


def test_shape_mismatch(saved) -> None:
    _, path = saved
    _rewrite(path, lambda t: t.__setitem__("final_norm.weight", torch.ones(7)))
    assert "shape mismatch for final_norm.weight" in _problem(path)


def test_dtype_mismatch(saved) -> None:
    _, path = saved
    _rewrite(path, lambda t: t.__setitem__("final_norm.weight", t["final_norm.weight"].double()))
    assert "dtype mismatch for final_norm.weight" in _problem(path)


def test_missing_tensor(saved) -> None:
    _, path = saved
    _rewrite(path, lambda t: t.pop("final_norm.weight"))
    assert "missing ['final_norm.weight']" in _problem(path)


def test_unknown_format_version(saved) -> None:
    _, path = saved
    _rewrite(path, lambda t: None, metadata={"format_version": "99", "arch": "chiar"})
    assert "unknown format version '99'" in _problem(path)


def test_invalid_config(saved) -> None:
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["n_heads"] = 5
    (path / "config.json").write_text(json.dumps(config))
    message = _problem(path)
    assert message.startswith(str(path / "config.json")) and "d_model" in message


def test_config_of_other_architecture(saved) -> None:
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config.update(arch="baseline", thresholds=None, bands=None)
    (path / "config.json").write_text(json.dumps(config))
    assert "does not match config arch" in _problem(path)


def test_bad_tokenizer(saved) -> None:
    _, path = saved
    (path / "tokenizer.json").write_text("{}")
    assert _problem(path).startswith(str(path / "tokenizer.json"))


def test_save_is_atomic_and_replaces(saved, tokenizer, tmp_path: Path, monkeypatch) -> None:
    model, path = saved
    before = (path / "model.safetensors").read_bytes()
    import model.checkpoint as ckpt

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", explode)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(model, tokenizer, path)
    assert str(info.value) == f"{path / 'model.safetensors'}: cannot write checkpoint file: disk full"
    assert (path / "model.safetensors").read_bytes() == before  # old checkpoint untouched
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp left
    monkeypatch.undo()
    with torch.no_grad():
        model.final_norm.weight.add_(1.0)
    save_checkpoint(model, tokenizer, path)
    assert (path / "model.safetensors").read_bytes() != before


def test_unwritable_target(saved, tokenizer, tmp_path: Path) -> None:
    model, _ = saved
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot write"):
        save_checkpoint(model, tokenizer, blocker / "ckpt")


def test_header_length_field(saved) -> None:
    _, path = saved
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    weights.write_bytes(bytes(data))
    assert "header longer than the file" in _problem(path)


# ---------------------------------------------------------------- checks before allocation
def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


_ABSURD = [("n_layers", 10**4), ("d_model", 10**6), ("vocab_size", 10**9)]


def test_absurd_sizes_fail_before_allocation(saved, tmp_path: Path) -> None:
    """Each absurd size is refused in a child process whose address space is capped at 4 GiB:
    building any of these models would need tens of GB, so an allocation would fail with a raw
    MemoryError instead of the one-line error naming the field."""
    _, path = saved
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, resource, shutil, sys\n"
        "from pathlib import Path\n"
        "from model import CheckpointError, load_checkpoint\n"
        "resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))\n"
        "src = Path(sys.argv[1])\n"
        "for field, value in json.loads(sys.argv[2]):\n"
        "    dst = Path(sys.argv[3]) / field\n"
        "    shutil.copytree(src, dst)\n"
        "    cfg = json.loads((dst / 'config.json').read_text()); cfg[field] = value\n"
        "    cfg.update(thresholds=None, bands=None) if field == 'n_layers' else None\n"
        "    (dst / 'config.json').write_text(json.dumps(cfg))\n"
        "    try:\n"
        "        load_checkpoint(dst)\n"
        "        print('LOADED', field)\n"
        "    except CheckpointError as exc:\n"
        "        print(str(exc))\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(script), str(path), json.dumps(_ABSURD), str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == len(_ABSURD)
    for line, (field, value) in zip(lines, _ABSURD):
        assert line.startswith(str(tmp_path / field / "config.json") + f": {field}: {value} exceeds the documented maximum"), line


@pytest.mark.parametrize("field, value", [("n_layers", 500), ("vocab_size", 5000), ("d_model", 64), ("d_ff", 512)])
def test_sizes_beyond_the_weights_name_the_field(saved, field: str, value: int) -> None:
    _, path = saved
    _edit_config(path, **{field: value}, thresholds=None, bands=None)
    message = _problem(path)
    assert message.startswith(f"{path / 'model.safetensors'}: {field}: "), message
    assert "\n" not in message


def test_rbf_centers_must_match_the_weights(saved) -> None:
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    _edit_config(path, rbf_centers=config["rbf_centers"] + 3)
    message = _problem(path)
    assert "shape mismatch" in message and "rbf_centers" in message, message


def test_header_entry_that_is_not_a_tensor(saved) -> None:
    _, path = saved
    weights = path / "model.safetensors"
    header = json.dumps({"__metadata__": {"format_version": FORMAT_VERSION, "arch": "chiar"}, "embed.weight": 7}).encode()
    weights.write_bytes(struct.pack("<Q", len(header)) + header)
    assert "bad entry for 'embed.weight'" in _problem(path)


def test_pickle_payload_is_never_unpickled(saved, tmp_path: Path) -> None:
    import pickle

    _, path = saved
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (path / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    assert "corrupt" in _problem(path) or "truncated" in _problem(path)
    assert not marker.exists()


def test_fifo_and_dangling_symlink(saved, tmp_path: Path) -> None:
    _, path = saved
    weights = path / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    assert _problem(path) == f"{weights}: not a regular file (a FIFO, device or directory)"
    weights.unlink()
    weights.symlink_to(tmp_path / "nowhere")
    assert _problem(path) == f"{weights}: dangling or looping symlink"


def test_oversized_config_is_not_parsed(saved) -> None:
    _, path = saved
    (path / "config.json").write_text("[" * (2**20 + 1))
    assert "over the" in _problem(path)


def test_shape_only_build_matches_the_real_model() -> None:
    from model.checkpoint_guard import expected_shapes

    for config in (tiny_config(operators=("dct", "rbf", "attention")), tiny_config(arch="baseline", tie_embeddings=False),
                   tiny_config(weights_dtype="bfloat16")):
        real = ChiarLM(config).state_dict()
        if config.tie_embeddings:
            real.pop("lm_head.weight")
        assert expected_shapes(config) == {k: (tuple(v.shape), v.dtype) for k, v in real.items()}
