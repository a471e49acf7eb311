"""CHIAR-Former model: public API used by training/, server/ and external code."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .chiar import ChiarLM
from .config import ChiarConfig, ConfigError
from .flops import FlopCount
from .generate import GenerateOutput
from .kv_cache import DecodeState
from .operators import Operator
from .output import ModelOutput, RoutingInfo
from .sampling import SamplingError, make_generator, sample_next, sample_tokens
from .spectral import dct, idct, spectral_entropy
from .stopping import FinishReason, StoppingCriteria

__all__ = [
    "CheckpointError",
    "ChiarConfig",
    "ChiarLM",
    "ConfigError",
    "DecodeState",
    "FinishReason",
    "FlopCount",
    "GenerateOutput",
    "ModelOutput",
    "Operator",
    "RoutingInfo",
    "SamplingError",
    "StoppingCriteria",
    "dct",
    "idct",
    "load_checkpoint",
    "make_generator",
    "sample_next",
    "sample_tokens",
    "save_checkpoint",
    "spectral_entropy",
]
