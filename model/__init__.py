"""CHIAR-Former model: public API used by training/, server/ and external code."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .chiar import OPERATOR_NAMES, ChiarLM, ModelOutput, RoutingInfo
from .config import ChiarConfig, ConfigError
from .flops import FlopCount
from .generate import GenerateOutput, make_generator, sample_next
from .kv_cache import DecodeState
from .spectral import dct, idct, spectral_entropy

__all__ = [
    "OPERATOR_NAMES",
    "CheckpointError",
    "ChiarConfig",
    "ChiarLM",
    "ConfigError",
    "DecodeState",
    "FlopCount",
    "GenerateOutput",
    "ModelOutput",
    "RoutingInfo",
    "dct",
    "idct",
    "load_checkpoint",
    "make_generator",
    "sample_next",
    "save_checkpoint",
    "spectral_entropy",
]
