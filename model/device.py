"""The one device rule of the server (`--device`) and training (`device:`): the accepted names, the
pydantic field type that checks them, and `resolve_device`, which also checks the machine."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import AfterValidator

DEVICE_HELP = "auto, cpu, cuda or cuda:N (auto: cuda when available)"


class DeviceError(ValueError):
    """The named device cannot be used here; the message starts with the setting's name."""


def check_device_name(name: str) -> str:
    """`name` if it is a device name both front ends accept (auto, cpu, cuda, cuda:<digits>), else a ValueError."""
    if name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise ValueError(f"must be {DEVICE_HELP}, got {name!r}")


Device = Annotated[str, AfterValidator(check_device_name)]  # the settings' and the configs' device field


def resolve_device(name: str, local_rank: int = 0, where: str = "device") -> torch.device:
    """The torch device `name` stands for on this machine: auto -> CUDA when available, else the CPU; cuda ->
    this process's GPU (`local_rank`, 0 alone). DeviceError, starting with `where`, when CUDA or that GPU is missing."""
    try:
        check_device_name(name)
    except ValueError as exc:
        raise DeviceError(f"{where}: {exc}") from None
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"{where}: {name!r} requested but CUDA is not available")
    index = local_rank if name == "cuda" else int(name[5:])
    if index >= torch.cuda.device_count():
        raise DeviceError(f"{where}: {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return torch.device("cuda", index)
