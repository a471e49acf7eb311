"""One device rule (issue 21): the server's --device and training's `device:` accept the same names and
resolve them the same way, GPU count included.

Before issue 21 the server accepted `cuda:x` and a CUDA index past the machine's GPUs, which training refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.__main__ import main as server_main
from server.settings import Settings, SettingsError
from training.config import EvalConfig, parse_config
from training.distributed import init_distributed
from training.errors import TrainingError

NAMES = ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "cuda:", "cuda:x", "cuda:-1", "cuda:0:1", "gpu", "CPU", "", "mps"]


def server_accepts(name: str, tmp_path: Path) -> bool:
    try:
        Settings.from_sources(["--checkpoint", str(tmp_path), "--device", name], environ={})
    except SettingsError as exc:
        assert "--device" in str(exc)
        return False
    return True


def training_accepts(name: str) -> bool:
    try:
        parse_config(EvalConfig, {"checkpoint": "x", "data": [{"name": "a", "path": "a.txt"}], "device": name})
    except TrainingError as exc:
        assert str(exc).startswith("device:"), exc
        return False
    return True


@pytest.mark.parametrize("name", NAMES)
def test_server_and_training_accept_the_same_device_names(name: str, tmp_path: Path) -> None:
    assert server_accepts(name, tmp_path) == training_accepts(name)
    assert server_accepts(name, tmp_path) == (name in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"))


@pytest.mark.parametrize("gpus", [0, 1])
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1", "cpu", "auto"])
def test_server_and_training_resolve_the_same_devices(name: str, gpus: int, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Both refuse a missing GPU before any work; both take the same device otherwise."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("CHIAR_MALLOC_TRIM", "false")  # leave this process's malloc settings alone
    usable = name in ("cpu", "auto") or (gpus == 1 and name in ("cuda", "cuda:0"))
    try:
        _, device = init_distributed(name)
        training = str(device)
    except (TrainingError, ValueError) as exc:
        training = None
        assert str(exc).startswith("device:"), exc
    # an empty checkpoint directory: the server stops at the device when that is wrong, else at the checkpoint
    code = server_main(["--checkpoint", str(tmp_path), "--device", name])
    err = capsys.readouterr().err
    assert code == (1 if usable else 2), err  # 1: the checkpoint cannot be loaded, 2: the settings are wrong
    assert ("--device" in err) == (not usable), err
    assert (training is not None) == usable
    if usable:
        assert training == ("cuda:0" if name != "cpu" and gpus else "cpu")
