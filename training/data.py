"""Text sources (files, directories, shipped corpora, ListOps), token streams and mixed-source batches.

Training text becomes one token stream per source (``<bos> doc <eos>`` per document), cut into
non-overlapping windows of ``seq_len + 1`` tokens. `MixedBatches` picks a source for every
micro-batch by its weight (a pure function of seed and micro-step) and walks a seeded permutation of
that source's windows; its whole position is a small JSON-able dict, so resumed runs continue on the
same data. Each batch carries the name of its source.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from training.config import SourceConfig
from training.errors import TrainingError
from training.listops import generate_listops


# ---------------------------------------------------------------------------- reading text
def read_text_file(path: Path, where: str) -> str:
    """Read a UTF-8 text file; a clear TrainingError for missing, empty or non-UTF-8 files."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TrainingError(f"{where}: file not found: {path}") from None
    except IsADirectoryError:
        raise TrainingError(f"{where}: {path} is a directory") from None
    except OSError as exc:
        raise TrainingError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TrainingError(
            f"{where}: {path} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "convert it to UTF-8 first"
        ) from None
    if not text.strip():
        raise TrainingError(f"{where}: {path} is empty")
    return text


def _directory_files(path: Path, where: str) -> list[Path]:
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise TrainingError(f"{where}: directory {path} holds no files")
    return files


def cut_at_line(text: str, max_bytes: int) -> str:
    """The longest prefix of whole lines within `max_bytes` UTF-8 bytes (at least one line)."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    head = data[:max_bytes]
    newline = head.rfind(b"\n")
    if newline >= 0:
        head = head[: newline + 1]
    return head.decode("utf-8", errors="ignore")


def split_holdout(text: str, fraction: float) -> tuple[str, str]:
    """Split at the line boundary nearest to (1 - fraction) of the text: (train head, held-out tail)."""
    if fraction <= 0:
        return text, ""
    cut = int(len(text) * (1.0 - fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def load_documents(src: SourceConfig, where: str) -> list[str]:
    """The documents of one source (a file is one document; a directory one per file)."""
    if src.listops is not None:
        c = src.listops
        try:
            examples = generate_listops(
                c.num_examples, c.seed, c.max_depth, c.max_args, c.min_length, c.max_length, c.leaf_prob
            )
        except ValueError as exc:
            raise TrainingError(f"{where}.listops.{exc}") from None
        docs = ["\n".join(e.text for e in examples) + "\n"]
    else:
        path = src.file_path
        assert path is not None
        if path.is_dir():
            docs = [read_text_file(p, where) for p in _directory_files(path, where)]
        else:
            docs = [read_text_file(path, where)]
    if src.max_bytes is not None:
        kept, budget = [], src.max_bytes
        for doc in docs:
            if budget <= 0:
                break
            piece = cut_at_line(doc, budget)
            kept.append(piece)
            budget -= len(piece.encode("utf-8"))
        docs = [d for d in kept if d.strip()]
        if not docs:
            raise TrainingError(f"{where}.max_bytes: {src.max_bytes} bytes keep no text")
    return docs


@dataclass
class EvalText:
    """A held-out text scored as one sequence (BOS prepended)."""

    name: str
    text: str

    @property
    def words(self) -> int:
        return len(self.text.split())

    @property
    def bytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass
class LoadedSources:
    train: dict[str, list[str]]  # source name -> documents
    weights: dict[str, float]
    eval: list[EvalText]


def load_sources(train: list[SourceConfig], evals: list[SourceConfig], eval_max_bytes: int | None = None) -> LoadedSources:
    """Read every source; holdout tails of training sources become validation texts of the same name."""
    texts: dict[str, list[str]] = {}
    held: list[EvalText] = []
    for i, src in enumerate(train):
        where = f"data[{i}] ({src.name})"
        docs = load_documents(src, where)
        if src.holdout > 0:
            parts = [split_holdout(d, src.holdout) for d in docs]
            docs = [head for head, _ in parts if head.strip()]
            tail = "".join(t for _, t in parts)
            if not tail.strip() or not docs:
                raise TrainingError(f"{where}.holdout: {src.holdout} leaves no training or no held-out text")
            held.append(EvalText(src.name, tail))
        texts[src.name] = docs
    for i, src in enumerate(evals):
        docs = load_documents(src, f"eval_data[{i}] ({src.name})")
        held.append(EvalText(src.name, "".join(d if d.endswith("\n") else d + "\n" for d in docs)))
    if eval_max_bytes is not None:
        held = [EvalText(e.name, cut_at_line(e.text, eval_max_bytes)) for e in held]
    return LoadedSources(texts, {s.name: s.weight for s in train}, held)


# ---------------------------------------------------------------------------- tokens
def encode_documents(tokenizer: Tokenizer, docs: list[str], bos_id: int, eos_id: int) -> torch.Tensor:
    """One int64 stream: <bos> doc <eos> for each document."""
    encoded = tokenizer.encode_batch(docs, add_special_tokens=False)
    ids: list[int] = []
    for enc in encoded:
        ids.append(bos_id)
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def _stable_seed(*parts: Any) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Batch:
    source: str
    input_ids: torch.Tensor  # [B, seq_len]
    labels: torch.Tensor  # [B, seq_len], labels[:, t] is the token after position t

    @property
    def tokens(self) -> int:
        return self.labels.numel()


class MixedBatches:
    """Deterministic mixed-source micro-batches; `state_dict()` is the data position (JSON)."""

    def __init__(
        self, streams: dict[str, torch.Tensor], weights: dict[str, float], seq_len: int, batch_size: int, seed: int
    ) -> None:
        self.names = list(streams)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.windows: dict[str, torch.Tensor] = {}
        for name, stream in streams.items():
            n = (stream.numel() - 1) // seq_len
            if n < batch_size:
                raise TrainingError(
                    f"data ({name}): {stream.numel()} tokens give {n} windows of seq_len+1={seq_len + 1} tokens, "
                    f"fewer than one batch (batch_size={batch_size}); add text or lower batch_size/seq_len"
                )
            starts = torch.arange(n) * seq_len
            self.windows[name] = stream[starts[:, None] + torch.arange(seq_len + 1)]
        total = sum(weights[n] for n in self.names)
        self.cumulative: list[float] = []
        acc = 0.0
        for n in self.names:
            acc += weights[n] / total
            self.cumulative.append(acc)
        self.micro_step = 0
        self.cursors = {n: [0, 0] for n in self.names}  # [epoch, position in that epoch's permutation]
        self._perm_cache: dict[str, tuple[int, torch.Tensor]] = {}

    def num_windows(self, name: str) -> int:
        return self.windows[name].shape[0]

    def _source_for(self, micro_step: int) -> str:
        if len(self.names) == 1:
            return self.names[0]
        u = random.Random(f"mix:{self.seed}:{micro_step}").random()
        for name, edge in zip(self.names, self.cumulative):
            if u < edge:
                return name
        return self.names[-1]

    def _permutation(self, name: str, epoch: int) -> torch.Tensor:
        cached = self._perm_cache.get(name)
        if cached is None or cached[0] != epoch:
            gen = torch.Generator().manual_seed(_stable_seed("perm", self.seed, name, epoch))
            cached = (epoch, torch.randperm(self.num_windows(name), generator=gen))
            self._perm_cache[name] = cached
        return cached[1]

    def next(self) -> Batch:
        """The next global micro-batch (all ranks draw the same one and keep their rows)."""
        name = self._source_for(self.micro_step)
        epoch, pos = self.cursors[name]
        rows = []
        for _ in range(self.batch_size):
            perm = self._permutation(name, epoch)
            rows.append(int(perm[pos]))
            pos += 1
            if pos == perm.numel():
                epoch, pos = epoch + 1, 0
        self.cursors[name] = [epoch, pos]
        self.micro_step += 1
        windows = self.windows[name][torch.tensor(rows)]
        return Batch(name, windows[:, :-1].contiguous(), windows[:, 1:].contiguous())

    def state_dict(self) -> dict[str, Any]:
        return {"micro_step": self.micro_step, "cursors": {k: list(v) for k, v in self.cursors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["cursors"]) != set(self.names):
            raise TrainingError(
                f"resume: the checkpoint's data sources {sorted(state['cursors'])} differ from the config's {sorted(self.names)}"
            )
        self.micro_step = int(state["micro_step"])
        self.cursors = {k: [int(v[0]), int(v[1])] for k, v in state["cursors"].items()}


def shard_batch(batch: Batch, rank: int, world_size: int) -> Batch:
    """This rank's rows of a global micro-batch (rows rank, rank + world, ...)."""
    if world_size == 1:
        return batch
    return Batch(batch.source, batch.input_ids[rank::world_size], batch.labels[rank::world_size])
