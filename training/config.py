"""Typed, validated configs for the four commands (pydantic); YAML/JSON files plus `--set key=value`.

Types are strict (no true-as-1, no "3"-as-3), unknown keys are rejected, and every error names the
dotted field at fault (``data[1].weight: must be a positive number, got 0``). Relative paths in a
config are relative to the working directory (the repository root in `make`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    InstanceOf,
    ValidationError,
    field_serializer,
    model_validator,
)

from model import ChiarConfig, ConfigError
from model.device import Device
from model.storage import atomic_write_text
from model.validation import field_path, problem
from training.errors import TrainingError

CORPORA = {
    "wikitext2-valid": "data/wikitext-2/valid.txt",
    "wikitext2-test": "data/wikitext-2/test.txt",
    "tinyshakespeare": "data/tinyshakespeare/input.txt",
}
EvalPath = Literal["reference", "hard", "infer"]
EVAL_PATHS: tuple[str, ...] = get_args(EvalPath)


# ---------------------------------------------------------------------------- value rules
def _rule(test: Callable[[Any], bool], message: str) -> AfterValidator:
    """A check whose failure reads `<field>: <message>, got <value>`."""

    def check(value: Any) -> Any:
        if not test(value):
            raise ValueError(f"{message}, got {value!r}")
        return value

    return AfterValidator(check)


Positive = Annotated[int, _rule(lambda v: v > 0, "must be positive")]
NonNegative = Annotated[int, _rule(lambda v: v >= 0, "must be >= 0")]
PositiveNumber = Annotated[float, _rule(lambda v: v > 0, "must be a positive number")]
NonNegativeNumber = Annotated[float, _rule(lambda v: v >= 0, "must be >= 0")]
Fraction = Annotated[float, _rule(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")]
NonEmpty = Annotated[str, _rule(bool, "must be a non-empty path")]


def _model_section(data: Any) -> ChiarConfig:
    """The `model:` section; vocab_size comes from the tokenizer, so it may not be set here."""
    if not isinstance(data, dict):
        raise ValueError(f"must be a mapping, got {type(data).__name__}")
    if "vocab_size" in data:
        raise ConfigError("vocab_size", "set by the tokenizer; set tokenizer.vocab_size instead")
    try:
        return ChiarConfig.from_dict({**data, "vocab_size": 8192})  # placeholder, replaced by the tokenizer's size
    except TypeError as exc:  # pydantic only reports ValueErrors
        raise ValueError(str(exc)) from exc


ModelSection = Annotated[InstanceOf[ChiarConfig], BeforeValidator(_model_section)]


class Section(BaseModel):
    """Strict types, finite numbers, and unknown keys named with the known ones."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise ConfigError(str(key), f"unknown key (known: {', '.join(cls.model_fields)})")
        return data


# ---------------------------------------------------------------------------- sections
class ListOpsConfig(Section):
    """Seeded ListOps generator (LRA style): nested MAX/MIN/MED/SM over digits 0-9."""

    num_examples: Positive = 2000
    seed: int = 0
    max_depth: Positive = 4  # nesting depth of operators (1 = a flat list)
    max_args: Annotated[int, _rule(lambda v: v >= 2, "must be >= 2")] = 5  # arguments per operator
    min_length: Positive = 1  # expression length in symbols (brackets, operators, digits)
    max_length: Annotated[int, _rule(lambda v: v >= 4, "must be >= 4 (the shortest expression)")] = 200
    leaf_prob: Fraction = 0.3  # chance an argument below the root is a digit rather than a sub-list

    @model_validator(mode="after")
    def _check(self) -> ListOpsConfig:
        if self.min_length > self.max_length:
            raise ConfigError("min_length", f"must be <= max_length ({self.max_length}), got {self.min_length}")
        return self


class SourceConfig(Section):
    """One text source: a file or directory (`path`), a shipped corpus (`corpus`) or `listops`."""

    name: Annotated[str, _rule(lambda v: bool(v) and not any(c in v for c in "/\\ \t\n"),
                               "must be a non-empty name without slashes or spaces")]
    path: str | None = None
    corpus: str | None = None
    listops: ListOpsConfig | None = None
    weight: PositiveNumber = 1.0  # sampling ratio among training sources (normalised)
    holdout: Fraction = 0.0  # fraction of the text's tail held out as a validation set of the same name
    max_bytes: Positive | None = None  # cut the text (at a line boundary) to at most this many UTF-8 bytes

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        given = [k for k in ("path", "corpus", "listops") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"needs exactly one of path, corpus, listops (got {given or 'none'})")
        if self.corpus is not None and self.corpus not in CORPORA:
            raise ConfigError("corpus", f"must be one of {sorted(CORPORA)}, got {self.corpus!r}")
        return self

    @property
    def file_path(self) -> Path | None:
        if self.path is not None:
            return Path(self.path)
        if self.corpus is not None:
            return Path(CORPORA[self.corpus])
        return None


class TokenizerConfig(Section):
    """Reuse `path` (a tokenizer.json or a checkpoint directory) or train one of `vocab_size`."""

    path: str | None = None
    vocab_size: int = 8192


def _unique_names(sources: list[SourceConfig], where: str, taken: set[str], what: str) -> set[str]:
    for i, src in enumerate(sources):
        if src.name in taken:
            raise ConfigError(f"{where}[{i}].name", f"duplicate {what} name {src.name!r}")
        taken.add(src.name)
    return taken


class TrainConfig(Section):
    """Everything `python -m training train` needs; `model` becomes a ChiarConfig."""

    out_dir: NonEmpty
    model: ModelSection
    data: list[SourceConfig]
    eval_data: list[SourceConfig] = []
    tokenizer: TokenizerConfig = TokenizerConfig()
    seq_len: Positive = 256
    batch_size: Positive = 16  # rows per micro-batch, global over all DDP ranks
    grad_accum: Positive = 1
    max_steps: Positive = 1000
    lr: PositiveNumber = 3e-4
    min_lr: float = 3e-5
    warmup_steps: NonNegative = 100
    weight_decay: NonNegativeNumber = 0.1
    betas: Annotated[list[float], _rule(lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v),
                                        "must be two numbers in [0, 1)")] = [0.9, 0.95]
    adam_eps: PositiveNumber = 1e-8
    grad_clip: NonNegativeNumber = 1.0  # max global grad norm; 0 disables clipping
    seed: NonNegative = 0
    device: Device = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    threads: Positive | None = None  # torch CPU threads (None: torch default)
    eval_every: NonNegative = 100  # 0: only at the end
    eval_max_bytes: Positive | None = 100_000  # per validation set during training (None: all)
    eval_stride: Positive | None = None  # sliding-window stride (None: seq_len // 2)
    eval_batch_size: Positive = 8
    eval_path: EvalPath = "reference"
    best_source: str | None = None  # validation set whose token PPL picks `best` (None: the first)
    checkpoint_every: NonNegative = 100  # 0: only at the end
    keep_last: Positive = 2
    resume: NonEmpty = "auto"  # auto (latest checkpoint in out_dir if any) | never | a checkpoint directory
    export_dir: str | None = None  # final model checkpoint (model.save_checkpoint layout)
    export: Literal["best", "last"] = "best"
    progress: bool = True  # tqdm bar on stderr (rank 0)

    @field_serializer("model")
    def _model_dict(self, model: ChiarConfig) -> dict[str, Any]:
        return {k: v for k, v in model.to_dict().items() if k != "vocab_size"}

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not self.data:
            raise ConfigError("data", "needs at least one training source")
        _unique_names(self.data, "data", set(), "source")
        eval_names = {s.name for s in self.data if s.holdout > 0}
        for i, src in enumerate(self.eval_data):
            if src.holdout:
                raise ConfigError(f"eval_data[{i}].holdout", "only training sources take a holdout")
        _unique_names(self.eval_data, "eval_data", eval_names, "validation set")
        if self.best_source is not None and self.best_source not in eval_names:
            raise ConfigError("best_source", f"{self.best_source!r} is not a validation set (have {sorted(eval_names)})")
        if self.tokenizer.path is None and self.tokenizer.vocab_size < 259:
            raise ConfigError("tokenizer.vocab_size", f"must be >= 259 for byte-level BPE, got {self.tokenizer.vocab_size}")
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError("seq_len", f"{self.seq_len} exceeds model.max_seq_len ({self.model.max_seq_len})")
        if self.eval_stride is not None and self.eval_stride > self.seq_len:
            raise ConfigError("eval_stride", f"must be in [1, seq_len], got {self.eval_stride}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("min_lr", f"must be in [0, lr], got {self.min_lr}")
        m = self.model
        if m.arch == "chiar" and m.routing in ("threshold", "threshold_reg") and m.thresholds is None:
            raise ConfigError(
                "model.thresholds",
                f"routing {m.routing!r} needs calibrated thresholds (one per routing layer, {m.n_routing_layers}); "
                "run `python -m training calibrate` on a baseline checkpoint first, or train with routing soft/ste",
            )
        return self


class CalibrateConfig(Section):
    """Measure spectral-entropy percentiles of a frozen checkpoint; write a calibrated CHIAR config."""

    checkpoint: str  # frozen model directory (normally the baseline)
    data: Annotated[list[SourceConfig], _rule(bool, "needs at least one calibration source")]
    template: str  # CHIAR train config to fill with thresholds and bands
    output: Annotated[str, _rule(lambda v: Path(v).suffix in (".yaml", ".yml", ".json"),
                                 "must end in .yaml, .yml or .json")]  # the calibrated train config
    report: str | None = None  # JSON with the per-layer percentiles (default: next to output)
    seq_len: Positive = 256
    batch_size: Positive = 8
    max_tokens: Positive = 100_000
    device: Device = "auto"


class EvalConfig(Section):
    """Score a checkpoint on held-out text: token PPL, word PPL, bits per byte, per source and path."""

    checkpoint: str
    data: Annotated[list[SourceConfig], _rule(bool, "needs at least one evaluation source")]
    seq_len: Annotated[int, _rule(lambda v: v >= 2, "must be >= 2")] | None = None  # window (None: max_seq_len)
    stride: Positive | None = None  # sliding-window stride (None: seq_len // 2)
    batch_size: Positive = 8
    paths: Annotated[list[EvalPath], _rule(bool, "needs at least one of reference, hard, infer")] = ["reference", "infer"]
    device: Device = "auto"
    output: str | None = None  # JSON results file

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        for i, src in enumerate(self.data):
            if src.holdout:
                raise ConfigError(f"data[{i}].holdout", "not used by eval")
        _unique_names(self.data, "data", set(), "source")
        return self


class HeatmapConfig(Section):
    """Routing heatmap (tokens x layers) of one text through a checkpoint."""

    checkpoint: str
    text: str
    path: EvalPath = "infer"
    max_tokens: Positive = 64


class PlotConfig(Section):
    """Figures from run directories (their log.jsonl) and, optionally, a routing heatmap."""

    out_dir: str
    runs: list[str] = []
    labels: list[str] | None = None
    source: str | None = None  # validation set for the PPL curves (None: all)
    heatmap: HeatmapConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> PlotConfig:
        if not self.runs and self.heatmap is None:
            raise ConfigError("runs", "give at least one run directory or a heatmap section")
        if self.labels is not None and len(self.labels) != len(self.runs):
            raise ConfigError("labels", f"needs one label per run ({len(self.runs)}), got {len(self.labels)}")
        return self


# ---------------------------------------------------------------------------- errors
def describe(error: Any) -> str:
    """One pydantic error as `<dotted field>: <problem>` (a ConfigError names its own field below the path)."""
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return f"{field_path(error['loc'], cause.field)}: {str(cause)[len(cause.field) + 2:]}"
    return f"{field_path(error['loc']) or 'config'}: {problem(error)}"


# ---------------------------------------------------------------------------- files and overrides
C = TypeVar("C", bound=BaseModel)


def parse_config(cls: type[C], data: dict[str, Any]) -> C:
    """Build and validate a config from a dict; a TrainingError names the first bad field."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise TrainingError(describe(exc.errors()[0])) from None


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
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise TrainingError(f"--set {key}: {here} is not an index of a {len(node)}-item list")
                index: Any = int(part)
            elif isinstance(node, dict):
                index = part
            else:
                raise TrainingError(f"--set {key}: {'.'.join(parts[:depth])} is not a mapping or list")
            if depth == len(parts) - 1:
                node[index] = value
            else:
                if isinstance(node, dict) and node.get(index) is None:
                    node[index] = {}
                node = node[index]
    return data


def load_config(cls: type[C], path: str | Path, overrides: list[str] | None = None) -> C:
    """Read, override and validate a config file."""
    return parse_config(cls, apply_overrides(read_config_file(path), list(overrides or [])))


def write_config_file(data: dict[str, Any], path: str | Path) -> None:
    """Write a config dict as YAML or JSON (by extension), atomically."""
    path = Path(path)
    text = json.dumps(data, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    atomic_write_text(path, text)
