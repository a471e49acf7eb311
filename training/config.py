"""Typed, validated configs for the four commands; YAML/JSON files plus `--set key=value` overrides.

Unknown keys are rejected and every error names the dotted field at fault (``data[1].weight: ...``).
Relative paths in a config are relative to the working directory (the repository root in `make`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from model import ChiarConfig, ConfigError
from training.errors import TrainingError

CORPORA = {
    "wikitext2-valid": "data/wikitext-2/valid.txt",
    "wikitext2-test": "data/wikitext-2/test.txt",
    "tinyshakespeare": "data/tinyshakespeare/input.txt",
}
EVAL_PATHS = ("reference", "hard", "infer")


# ---------------------------------------------------------------------------- sections
@dataclass
class ListOpsConfig:
    """Seeded ListOps generator (LRA style): nested MAX/MIN/MED/SM over digits 0-9."""

    num_examples: int = 2000
    seed: int = 0
    max_depth: int = 4  # nesting depth of operators (1 = a flat list)
    max_args: int = 5  # arguments per operator (>= 2)
    min_length: int = 1  # expression length in symbols (brackets, operators, digits)
    max_length: int = 200
    leaf_prob: float = 0.3  # chance an argument below the root is a digit rather than a sub-list

    def validate(self, where: str) -> None:
        _positive(self, where, "num_examples", "max_depth", "min_length", "max_length")
        if self.max_args < 2:
            raise TrainingError(f"{where}.max_args: must be >= 2, got {self.max_args}")
        if self.max_length < 4:
            raise TrainingError(f"{where}.max_length: must be >= 4 (the shortest expression), got {self.max_length}")
        if self.min_length > self.max_length:
            raise TrainingError(f"{where}.min_length: must be <= max_length ({self.max_length}), got {self.min_length}")
        if not 0.0 <= self.leaf_prob < 1.0:
            raise TrainingError(f"{where}.leaf_prob: must be in [0, 1), got {self.leaf_prob}")


@dataclass
class SourceConfig:
    """One text source: a file or directory (`path`), a shipped corpus (`corpus`) or `listops`."""

    name: str
    path: str | None = None
    corpus: str | None = None
    listops: ListOpsConfig | None = None
    weight: float = 1.0  # sampling ratio among training sources (normalised)
    holdout: float = 0.0  # fraction of the text's tail held out as a validation set of the same name
    max_bytes: int | None = None  # cut the text (at a line boundary) to at most this many UTF-8 bytes

    def validate(self, where: str) -> None:
        if not self.name or any(c in self.name for c in "/\\ \t\n"):
            raise TrainingError(f"{where}.name: must be a non-empty name without slashes or spaces, got {self.name!r}")
        given = [k for k in ("path", "corpus", "listops") if getattr(self, k) is not None]
        if len(given) != 1:
            raise TrainingError(f"{where}: needs exactly one of path, corpus, listops (got {given or 'none'})")
        if self.corpus is not None and self.corpus not in CORPORA:
            raise TrainingError(f"{where}.corpus: must be one of {sorted(CORPORA)}, got {self.corpus!r}")
        if self.listops is not None:
            self.listops.validate(f"{where}.listops")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise TrainingError(f"{where}.weight: must be a positive number, got {self.weight}")
        if not 0.0 <= self.holdout < 1.0:
            raise TrainingError(f"{where}.holdout: must be in [0, 1), got {self.holdout}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise TrainingError(f"{where}.max_bytes: must be positive, got {self.max_bytes}")

    @property
    def file_path(self) -> Path | None:
        if self.path is not None:
            return Path(self.path)
        if self.corpus is not None:
            return Path(CORPORA[self.corpus])
        return None


@dataclass
class TokenizerConfig:
    """Reuse `path` (a tokenizer.json or a checkpoint directory) or train one of `vocab_size`."""

    path: str | None = None
    vocab_size: int = 8192


@dataclass
class TrainConfig:
    """Everything `python -m training train` needs; `model` becomes a ChiarConfig."""

    out_dir: str
    model: ChiarConfig
    data: list[SourceConfig]
    eval_data: list[SourceConfig] = field(default_factory=list)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = 256
    batch_size: int = 16  # rows per micro-batch, global over all DDP ranks
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    threads: int | None = None  # torch CPU threads (None: torch default)
    eval_every: int = 100  # 0: only at the end
    eval_max_bytes: int | None = 100_000  # per validation set during training (None: all)
    eval_stride: int | None = None  # sliding-window stride (None: seq_len // 2)
    eval_batch_size: int = 8
    eval_path: Literal["reference", "hard", "infer"] = "reference"
    best_source: str | None = None  # validation set whose token PPL picks `best` (None: the first)
    checkpoint_every: int = 100  # 0: only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto (latest checkpoint in out_dir if any) | never | a checkpoint directory
    export_dir: str | None = None  # final model checkpoint (model.save_checkpoint layout)
    export: Literal["best", "last"] = "best"
    progress: bool = True  # tqdm bar on stderr (rank 0)

    def validate(self) -> None:
        if not self.out_dir:
            raise TrainingError("out_dir: must be a non-empty path")
        if not self.data:
            raise TrainingError("data: needs at least one training source")
        names: set[str] = set()
        for i, src in enumerate(self.data):
            src.validate(f"data[{i}]")
            if src.name in names:
                raise TrainingError(f"data[{i}].name: duplicate source name {src.name!r}")
            names.add(src.name)
        eval_names = {s.name for s in self.data if s.holdout > 0}
        for i, src in enumerate(self.eval_data):
            src.validate(f"eval_data[{i}]")
            if src.holdout:
                raise TrainingError(f"eval_data[{i}].holdout: only training sources take a holdout")
            if src.name in eval_names:
                raise TrainingError(f"eval_data[{i}].name: duplicate validation set name {src.name!r}")
            eval_names.add(src.name)
        if self.best_source is not None and self.best_source not in eval_names:
            raise TrainingError(f"best_source: {self.best_source!r} is not a validation set (have {sorted(eval_names)})")
        if self.tokenizer.path is None and self.tokenizer.vocab_size < 259:
            raise TrainingError(f"tokenizer.vocab_size: must be >= 259 for byte-level BPE, got {self.tokenizer.vocab_size}")
        _positive(self, "", "seq_len", "batch_size", "grad_accum", "max_steps", "eval_batch_size", "keep_last")
        _non_negative(self, "", "warmup_steps", "eval_every", "checkpoint_every", "weight_decay", "grad_clip", "seed")
        if self.seq_len > self.model.max_seq_len:
            raise TrainingError(f"seq_len: {self.seq_len} exceeds model.max_seq_len ({self.model.max_seq_len})")
        if self.eval_stride is not None and not 1 <= self.eval_stride <= self.seq_len:
            raise TrainingError(f"eval_stride: must be in [1, seq_len], got {self.eval_stride}")
        if self.eval_max_bytes is not None and self.eval_max_bytes <= 0:
            raise TrainingError(f"eval_max_bytes: must be positive or null, got {self.eval_max_bytes}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainingError(f"lr: must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise TrainingError(f"min_lr: must be in [0, lr], got {self.min_lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise TrainingError(f"betas: must be two numbers in [0, 1), got {self.betas}")
        if not self.adam_eps > 0:
            raise TrainingError(f"adam_eps: must be positive, got {self.adam_eps}")
        if self.threads is not None and self.threads <= 0:
            raise TrainingError(f"threads: must be positive or null, got {self.threads}")
        _check_device(self.device, "device")
        if self.resume not in ("auto", "never") and not self.resume:
            raise TrainingError("resume: must be 'auto', 'never' or a checkpoint directory")
        m = self.model
        if m.arch == "chiar" and m.routing in ("threshold", "threshold_reg") and m.thresholds is None:
            raise TrainingError(
                f"model.thresholds: routing {m.routing!r} needs calibrated thresholds (one per routing layer, "
                f"{m.n_routing_layers}); run `python -m training calibrate` on a baseline checkpoint first, "
                "or train with routing soft/ste"
            )


@dataclass
class CalibrateConfig:
    """Measure spectral-entropy percentiles of a frozen checkpoint; write a calibrated CHIAR config."""

    checkpoint: str  # frozen model directory (normally the baseline)
    data: list[SourceConfig]  # calibration text
    template: str  # CHIAR train config to fill with thresholds and bands
    output: str  # where the calibrated train config is written (.yaml/.yml/.json)
    report: str | None = None  # JSON with the per-layer percentiles (default: next to output)
    seq_len: int = 256
    batch_size: int = 8
    max_tokens: int = 100_000
    device: str = "auto"

    def validate(self) -> None:
        if not self.data:
            raise TrainingError("data: needs at least one calibration source")
        for i, src in enumerate(self.data):
            src.validate(f"data[{i}]")
        _positive(self, "", "seq_len", "batch_size", "max_tokens")
        _check_device(self.device, "device")
        if Path(self.output).suffix not in (".yaml", ".yml", ".json"):
            raise TrainingError(f"output: must end in .yaml, .yml or .json, got {self.output!r}")


@dataclass
class EvalConfig:
    """Score a checkpoint on held-out text: token PPL, word PPL, bits per byte, per source and path."""

    checkpoint: str
    data: list[SourceConfig]
    seq_len: int | None = None  # window (None: the model's max_seq_len)
    stride: int | None = None  # sliding-window stride (None: seq_len // 2)
    batch_size: int = 8
    paths: list[Literal["reference", "hard", "infer"]] = field(default_factory=lambda: ["reference", "infer"])
    device: str = "auto"
    output: str | None = None  # JSON results file

    def validate(self) -> None:
        if not self.data:
            raise TrainingError("data: needs at least one evaluation source")
        names: set[str] = set()
        for i, src in enumerate(self.data):
            src.validate(f"data[{i}]")
            if src.holdout:
                raise TrainingError(f"data[{i}].holdout: not used by eval")
            if src.name in names:
                raise TrainingError(f"data[{i}].name: duplicate source name {src.name!r}")
            names.add(src.name)
        _positive(self, "", "batch_size")
        if self.seq_len is not None and self.seq_len < 2:
            raise TrainingError(f"seq_len: must be >= 2, got {self.seq_len}")
        if self.stride is not None and self.stride < 1:
            raise TrainingError(f"stride: must be >= 1, got {self.stride}")
        if not self.paths:
            raise TrainingError("paths: needs at least one of reference, hard, infer")
        _check_device(self.device, "device")


@dataclass
class HeatmapConfig:
    """Routing heatmap (tokens x layers) of one text through a checkpoint."""

    checkpoint: str
    text: str
    path: Literal["infer", "reference", "hard"] = "infer"
    max_tokens: int = 64


@dataclass
class PlotConfig:
    """Figures from run directories (their log.jsonl) and, optionally, a routing heatmap."""

    out_dir: str
    runs: list[str] = field(default_factory=list)
    labels: list[str] | None = None
    source: str | None = None  # validation set for the PPL curves (None: all)
    heatmap: HeatmapConfig | None = None

    def validate(self) -> None:
        if not self.runs and self.heatmap is None:
            raise TrainingError("runs: give at least one run directory or a heatmap section")
        if self.labels is not None and len(self.labels) != len(self.runs):
            raise TrainingError(f"labels: needs one label per run ({len(self.runs)}), got {len(self.labels)}")
        if self.heatmap is not None and self.heatmap.max_tokens < 1:
            raise TrainingError(f"heatmap.max_tokens: must be positive, got {self.heatmap.max_tokens}")


# ---------------------------------------------------------------------------- helpers
def _positive(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise TrainingError(f"{_join(where, name)}: must be positive, got {value}")


def _non_negative(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (math.isfinite(value) and value >= 0):
            raise TrainingError(f"{_join(where, name)}: must be >= 0, got {value}")


def _check_device(device: str, where: str) -> None:
    ok = device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    if not ok:
        raise TrainingError(f"{where}: must be auto, cpu, cuda or cuda:N, got {device!r}")


def _join(prefix: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{prefix}[{name}]"
    return f"{prefix}.{name}" if prefix else name


T = TypeVar("T")


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise TrainingError(f"{where}: must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except TrainingError as exc:
                errors.append(str(exc))
        raise TrainingError(errors[0])
    if value is None:
        raise TrainingError(f"{where}: must not be null")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise TrainingError(f"{where}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise TrainingError(f"{where}: must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, _join(where, i)) for i, v in enumerate(value)]
    if tp is ChiarConfig:
        return _model_config(value, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise TrainingError(f"{where}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainingError(f"{where}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainingError(f"{where}: must be a number, got {value!r}")
        if not math.isfinite(value):
            raise TrainingError(f"{where}: must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TrainingError(f"{where}: must be a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise TrainingError(f"{where}: must be a mapping, got {type(value).__name__}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _build(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise TrainingError(f"{where or 'config'}: must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise TrainingError(f"{_join(where, str(key))}: unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TrainingError(f"{_join(where, name)}: required key is missing")
    return cls(**kwargs)


def _model_config(data: Any, where: str) -> ChiarConfig:
    """The `model:` section; vocab_size comes from the tokenizer, so it may not be set here."""
    if not isinstance(data, dict):
        raise TrainingError(f"{where}: must be a mapping, got {type(data).__name__}")
    if "vocab_size" in data:
        raise TrainingError(f"{where}.vocab_size: set by the tokenizer; set tokenizer.vocab_size instead")
    data = dict(data)
    data["vocab_size"] = 8192  # placeholder for validation; replaced by the tokenizer's size
    try:
        return ChiarConfig.from_dict(data)
    except ConfigError as exc:
        raise TrainingError(f"{where}.{exc}") from exc
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"{where}: {exc}") from exc


# ---------------------------------------------------------------------------- files and overrides
def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a .yaml/.yml/.json config file into a dict."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise TrainingError(f"--config: {path} must end in .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainingError(f"--config: file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingError(f"--config: cannot read {path}: {exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise TrainingError(f"--config: {path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TrainingError(f"--config: {path} must hold a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML; numeric segments index lists)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise TrainingError(f"--set: expected key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise TrainingError(f"--set {key}: cannot parse value {raw!r}: {exc}") from None
        parts = key.split(".")
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise TrainingError(f"--set {key}: {here} is not an index of a {len(node)}-item list")
                index: Any = int(part)
            elif isinstance(node, dict):
                index = part
            else:
                raise TrainingError(f"--set {key}: {'.'.join(parts[:depth])} is not a mapping or list")
            if last:
                node[index] = value
            else:
                if isinstance(node, dict) and node.get(index) is None:
                    node[index] = {}
                node = node[index]
    return data


def parse_config(cls: type[T], data: dict[str, Any]) -> T:
    """Build and validate a config dataclass from a dict."""
    cfg = _build(cls, data, "")
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def load_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read, override and validate a config file."""
    return parse_config(cls, apply_overrides(read_config_file(path), list(overrides or [])))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config (the model section as ChiarConfig.to_dict, minus vocab_size)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, ChiarConfig):
        d = value.to_dict()
        d.pop("vocab_size", None)
        return d
    if dataclasses.is_dataclass(value):
        return config_to_dict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def write_config_file(data: dict[str, Any], path: str | Path) -> None:
    """Write a config dict as YAML or JSON (by extension), atomically."""
    path = Path(path)
    text = json.dumps(data, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
