"""Tampered checkpoints: each must load or fail with one clean line, never crash, hang or allocate wildly."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from loadtests.server_process import ROOT
from reliability.report import ProbeResult

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"

_LOADER = r"""
import json, resource, signal, sys, traceback
resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
from model import CheckpointError, load_checkpoint
def alarm(*_): raise TimeoutError("hung for 30 s")
signal.signal(signal.SIGALRM, alarm)
for path in sys.argv[1:]:
    signal.alarm(30)
    try:
        load_checkpoint(path)
        out = {"outcome": "loaded", "message": ""}
    except CheckpointError as exc:
        out = {"outcome": "error", "message": str(exc)}
    except BaseException as exc:
        out = {"outcome": "crash", "message": f"{type(exc).__name__}: {exc}"[:300]}
    signal.alarm(0)
    print(json.dumps({"path": path, **out}), flush=True)
"""


class _Pickled:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch /tmp/chiar-pickle-was-executed",))


def _edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / CONFIG).read_text())
        cfg.update(changes)
        if "n_layers" in changes:
            cfg.update(thresholds=None, bands=None)
        (d / CONFIG).write_text(json.dumps(cfg))
    return edit


def _truncate(keep: int) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = (d / WEIGHTS).read_bytes()
        (d / WEIGHTS).write_bytes(data[:keep])  # negative: cut the tail
    return edit


def _flip(where: str, seed: int) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = bytearray((d / WEIGHTS).read_bytes())
        header_len = int.from_bytes(data[:8], "little")
        rng = random.Random(seed)
        lo, hi = (0, 8 + header_len) if where == "header" else (8 + header_len, len(data))
        for _ in range(4):
            data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
        (d / WEIGHTS).write_bytes(bytes(data))
    return edit


def _wrong_shape(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / WEIGHTS))
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].flatten()[:-1].clone()
    save_file(tensors, str(d / WEIGHTS), metadata={"format_version": "1", "arch": json.loads((d / CONFIG).read_text())["arch"]})


def _replace(name: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        (d / name).unlink()
        make(d / name)
    return edit


def cases() -> dict[str, Callable[[Path], None]]:
    out: dict[str, Callable[[Path], None]] = {}
    for keep in (0, 7, 8, 100, -1, -4096):
        out[f"truncated weights ({keep} bytes kept)" if keep >= 0 else f"truncated weights (last {-keep} bytes cut)"] = _truncate(keep)
    for seed in range(3):
        out[f"flipped header bits (seed {seed})"] = _flip("header", seed)
        out[f"flipped tensor-data bits (seed {seed})"] = _flip("data", seed)
    out["wrong tensor shape"] = _wrong_shape
    out["config d_ff does not match"] = _edit_config(d_ff=48)
    out["config operators do not match"] = _edit_config(operators=["dct", "rbf", "attn"], rbf_centers=7)
    out["config rbf_centers changed"] = _edit_config(rbf_centers=7)  # unused (loads) unless the model has RBF layers
    for field, value in (("n_layers", 10**4), ("d_model", 10**6), ("vocab_size", 10**9), ("max_seq_len", 10**9),
                         ("d_ff", 10**8), ("n_layers", 300)):
        out[f"absurd {field}={value}"] = _edit_config(**{field: value})
    out["pickle payload as weights"] = _replace(WEIGHTS, lambda p: p.write_bytes(pickle.dumps(_Pickled())))
    out["pickle payload as config"] = _replace(CONFIG, lambda p: p.write_bytes(pickle.dumps(_Pickled())))
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        out[f"FIFO as {name}"] = _replace(name, lambda p: os.mkfifo(p))
        out[f"dangling symlink as {name}"] = _replace(name, lambda p: p.symlink_to(p.parent / "nowhere"))
        out[f"missing {name}"] = lambda d, name=name: (d / name).unlink()
    out["symlink loop as weights"] = _replace(WEIGHTS, lambda p: p.symlink_to(p))
    out["weights symlinked to /dev/zero"] = _replace(WEIGHTS, lambda p: p.symlink_to("/dev/zero"))
    out["directory as weights"] = _replace(WEIGHTS, lambda p: p.mkdir())
    out["config is not JSON"] = lambda d: (d / CONFIG).write_text("{nope")
    out["config nested 100000 deep"] = lambda d: (d / CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    out["tokenizer is garbage"] = lambda d: (d / TOKENIZER).write_bytes(b"\x00\xff" * 100)
    return out


def probe_tampered(checkpoint: Path, work: Path) -> ProbeResult:
    root = work / "tampered"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    paths: dict[str, Path] = {}
    for i, edit in enumerate(cases().values()):
        d = root / f"case-{i:02d}"
        shutil.copytree(checkpoint, d)
        edit(d)
        paths[str(d)] = d
    names = dict(zip(paths, cases()))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _LOADER, *paths], capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    seen = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    outcomes = {row["path"]: row for row in seen}
    failures, loaded, clean = [], [], 0
    for path, name in names.items():
        row = outcomes.get(path)
        if row is None:
            failures.append(f"{name}: loader process died ({proc.returncode}): {proc.stderr[-200:]}")
        elif row["outcome"] == "crash" or (row["outcome"] == "error" and "\n" in row["message"]):
            failures.append(f"{name}: {row['message']}")
        elif row["outcome"] == "loaded":
            loaded.append(name)
        else:
            clean += 1
    cli = subprocess.run([sys.executable, "-m", "server", "--checkpoint", str(next(iter(paths))), "--port", "0"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    cli_lines = [line for line in cli.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    cli_ok = cli.returncode != 0 and len(cli_lines) == 1 and "Traceback" not in cli.stderr
    if not cli_ok:
        failures.append(f"python -m server on {names[next(iter(paths))]}: exit {cli.returncode}: {cli.stderr[-300:]}")
    pickle_ran = Path("/tmp/chiar-pickle-was-executed").exists()
    if pickle_ran:
        failures.append("a pickle payload was executed")
    bit_flips_loaded = [n for n in loaded if "tensor-data" in n]
    cfg = json.loads((checkpoint / CONFIG).read_text())
    rbf_unused = [n for n in loaded if n == "config rbf_centers changed" and "rbf" not in cfg.get("operators", [])]
    other_loaded = [n for n in loaded if n not in bit_flips_loaded and n not in rbf_unused]
    failures += [f"{n}: loaded without an error" for n in other_loaded]
    examples = {names[p]: outcomes[p]["message"].replace(str(p), "<ckpt>") for p in list(paths)[:40:6] if p in outcomes}
    return ProbeResult(
        "tampered-checkpoints", "copies of the checkpoint truncated, bit-flipped, reshaped, with absurd sizes, pickle payloads, "
        "FIFOs, dangling/looping symlinks, /dev/zero, directories and garbage in place of each file; all loaded in one "
        "process capped at 6 GiB of address space with a 30 s alarm per case, plus `python -m server` on one of them", len(names) + 1,
        f"{clean} refused with one clean line; pickle never executed: {not pickle_ran}; server CLI exits with one error line: {cli_ok}",
        f"{len(failures)} crashes, hangs or multi-line errors; {len(bit_flips_loaded)} tensor-data bit flips load unnoticed "
        "(safetensors has no checksum)", passed=not failures,
        figures={"loaded (tensor-data bit flips, undetectable)": len(bit_flips_loaded),
                 "loaded (rbf_centers unused: no RBF layers in this model)": len(rbf_unused), **{f"e.g. {k}": v for k, v in examples.items()}},
        failures=failures)
