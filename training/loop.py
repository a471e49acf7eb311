"""The training loop: AdamW + warmup/cosine LR, clipping, accumulation, autocast, DDP, eval, checkpoints.

Run directory (`out_dir`):
  train_config.json   the resolved config      tokenizer.json   the run's tokenizer
  log.jsonl           one record per step ({"kind": "train"}) and per evaluation ({"kind": "eval"})
  checkpoints/step-N  resumable checkpoints (last `keep_last`)    best/   best validation token PPL
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import ChiarLM, Operator
from model.routing import GATE_OPEN
from training.checkpointing import (
    check_resumable,
    clean_stale,
    copy_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    prune_checkpoints,
    save_model_only,
    save_training_checkpoint,
)
from training.config import TrainConfig
from training.data import Batch, LoadedSources, MixedBatches, encode_documents, load_sources, shard_batch
from training.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_flag,
    broadcast_text,
    init_distributed,
    shutdown,
)
from training.errors import TrainingError
from training.evaluate import attention_shares, evaluate_texts, mean_routed_share, operator_shares
from training.parts import CosineSchedule, JsonlLog, autocast_dtype, check_special_ids, load_tokenizer, param_groups, weights_digest
from training.paths import check_path_usable, probe_writable
from training.tokenizer import SPECIAL_TOKENS, train_tokenizer


# ---------------------------------------------------------------------------- setup
@dataclass
class Prepared:
    tokenizer: Tokenizer
    model_config: Any
    sources: LoadedSources
    batches: MixedBatches
    resume_from: Path | None


def _find_resume(cfg: TrainConfig, ckpt_dir: Path, out_dir: Path) -> Path | None:
    if cfg.resume == "never":
        if list_checkpoints(ckpt_dir) or (out_dir / "log.jsonl").exists():
            raise TrainingError(f"resume: out_dir {out_dir} already holds a run; set resume=auto to continue it or use a new out_dir")
        return None
    if cfg.resume == "auto":
        found = list_checkpoints(ckpt_dir)
        return found[-1][1] if found else None
    path = Path(cfg.resume)
    if not path.is_dir():
        raise TrainingError(f"resume: checkpoint directory not found: {path}")
    return path


def prepare(cfg: TrainConfig, info: DistInfo, device: torch.device) -> Prepared:
    """Validate every input before anything is written: data, tokenizer, resume target, output paths."""
    out_dir = Path(cfg.out_dir)
    check_path_usable(out_dir, "out_dir")
    if cfg.export_dir:
        check_path_usable(Path(cfg.export_dir), "export_dir")
    sources = load_sources(cfg.data, cfg.eval_data, cfg.eval_max_bytes)
    resume_from = _find_resume(cfg, out_dir / "checkpoints", out_dir)

    tok_text: str | None = None
    if info.is_main:
        if resume_from is not None:
            tok = load_tokenizer(resume_from, "resume")
        elif cfg.tokenizer.path:
            tok = load_tokenizer(cfg.tokenizer.path, "tokenizer.path")
        else:
            texts = [d for docs in sources.train.values() for d in docs]
            chunks = [t[i : i + 100_000] for t in texts for i in range(0, len(t), 100_000)]
            tok = train_tokenizer(chunks, cfg.tokenizer.vocab_size)
        tok_text = tok.to_str()
    tokenizer = Tokenizer.from_str(broadcast_text(tok_text, info, device))

    model_config = cfg.model.replace(
        vocab_size=tokenizer.get_vocab_size(),
        extra={**cfg.model.extra, "training": {k: v for k, v in cfg.model_dump().items() if k != "model"}},
    )
    for i, name in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(name) is None:
            raise TrainingError(f"tokenizer: special token {name} (id {i}) is missing")
    check_special_ids(tokenizer, model_config, "tokenizer")
    if resume_from is not None:
        check_resumable(resume_from, model_config)

    streams = {
        name: encode_documents(tokenizer, docs, model_config.bos_token_id, model_config.eos_token_id)
        for name, docs in sources.train.items()
    }
    if cfg.batch_size % info.world_size:
        raise TrainingError(f"batch_size: {cfg.batch_size} must be divisible by the number of processes ({info.world_size})")
    batches = MixedBatches(streams, sources.weights, cfg.seq_len, cfg.batch_size, cfg.seed)
    return Prepared(tokenizer, model_config, sources, batches, resume_from)


# ---------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) per `cfg`; returns a summary. Works alone or under torchrun."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info, device = init_distributed(cfg.device)
    try:
        return _train(cfg, info, device)
    finally:
        shutdown(info)


def _train(cfg: TrainConfig, info: DistInfo, device: torch.device) -> dict[str, Any]:
    """Set up (or resume) the run, loop over its steps, then export."""
    run = set_up(cfg, prepare(cfg, info, device), info, device)
    run_steps(run)
    return finish(run)


@dataclass
class Run:
    """A training run once set up: the model, its optimizer and schedule, the log, where it starts."""

    cfg: TrainConfig
    prep: Prepared
    info: DistInfo
    device: torch.device
    model: ChiarLM
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    schedule: CosineSchedule
    log: JsonlLog
    amp: torch.dtype | None
    start_step: int
    best: dict[str, Any]
    last_eval: dict[str, Any] | None = None

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def best_dir(self) -> Path:
        return self.out_dir / "best"


def _ready_outputs(cfg: TrainConfig, info: DistInfo, device: torch.device) -> None:
    """Rank 0 checks the output paths are writable and cleans what a killed run left; every rank learns the outcome."""
    out_dir = Path(cfg.out_dir)
    error = None
    if info.is_main:
        try:
            probe_writable(out_dir, "out_dir")
            if cfg.export_dir:
                probe_writable(Path(cfg.export_dir).parent, "export_dir")
            clean_stale(out_dir / "checkpoints")
            clean_stale(out_dir)
            if cfg.export_dir:
                clean_stale(Path(cfg.export_dir).parent, Path(cfg.export_dir).name)
        except TrainingError as exc:
            error = exc
    if not broadcast_flag(error is None, info, device):
        raise error or TrainingError("out_dir: rank 0 could not prepare the output directory")


def set_up(cfg: TrainConfig, prep: Prepared, info: DistInfo, device: torch.device) -> Run:
    """The seeded model and optimizer, restored from the resume checkpoint if any; the run files written."""
    _ready_outputs(cfg, info, device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = ChiarLM(prep.model_config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps
    )
    out_dir = Path(cfg.out_dir)
    log = JsonlLog(out_dir / "log.jsonl", info.is_main)
    start_step, best = 0, {"metric": None, "step": None, "source": None}
    if prep.resume_from is not None:
        meta = load_training_checkpoint(prep.resume_from, model, optimizer)
        prep.batches.load_state_dict(meta["data"])
        start_step, best = int(meta["step"]), meta["best"]
    log.truncate(start_step)  # drop records a killed run wrote after its last checkpoint
    if info.is_main:
        (out_dir / "tokenizer.json").write_text(prep.tokenizer.to_str(), encoding="utf-8")
        (out_dir / "train_config.json").write_text(json.dumps(cfg.model_dump(), indent=2), encoding="utf-8")
    net: torch.nn.Module = model
    if info.enabled:
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    return Run(cfg, prep, info, device, model, net, optimizer, CosineSchedule(cfg.lr, cfg.min_lr, cfg.warmup_steps,
               cfg.max_steps), log, autocast_dtype(cfg.precision, device), start_step, best)


def run_steps(run: Run) -> None:
    """The steps from `run.start_step` to max_steps: one optimizer step each, then evaluation and checkpoints when due."""
    cfg, info = run.cfg, run.info
    bar = tqdm(
        total=cfg.max_steps, initial=run.start_step, disable=not (cfg.progress and info.is_main), file=sys.stderr,
        dynamic_ncols=True, desc=f"train {run.prep.model_config.arch}",
    )
    t_start = time.perf_counter()
    try:
        for step in range(run.start_step, cfg.max_steps):
            t0 = time.perf_counter()
            lr = run.schedule(step)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            stats = _train_step(cfg, run.net, run.model, run.optimizer, run.prep.batches, info, run.device, run.amp,
                                run.prep.batches.names)
            done = step + 1
            elapsed = time.perf_counter() - t0
            record = {
                "kind": "train", "step": done, "lr": lr, **stats,
                "tok_per_s": stats["tokens"] / max(elapsed, 1e-9), "time": time.perf_counter() - t_start,
            }
            run.log.write(record)
            bar.update(1)
            bar.set_postfix(_postfix(record, run.prep.model_config.arch), refresh=False)
            final = done == cfg.max_steps
            if run.prep.sources.eval and ((cfg.eval_every and done % cfg.eval_every == 0) or final):
                _evaluate(run, done, bar)
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or final:
                _checkpoint(run, done)
    finally:
        bar.close()
        run.log.close()


def _evaluate(run: Run, done: int, bar: tqdm) -> None:
    """Rank 0 scores the eval sets, logs them and saves the best model so far; every rank waits for it."""
    cfg = run.cfg
    eval_sets = run.prep.sources.eval
    if run.info.is_main:
        best_source = cfg.best_source or eval_sets[0].name
        stride = cfg.eval_stride or max(cfg.seq_len // 2, 1)
        run.last_eval = evaluate_texts(
            run.model, run.prep.tokenizer, eval_sets, cfg.seq_len, stride, cfg.eval_batch_size,
            cfg.eval_path, run.device, run.amp,
        )
        run.log.write({"kind": "eval", "step": done, "path": cfg.eval_path, "sets": run.last_eval})
        metric = run.last_eval[best_source]["token_ppl"]
        bar.write(f"step {done}: " + ", ".join(f"{k} ppl {v['token_ppl']:.2f}" for k, v in run.last_eval.items()))
        if run.best["metric"] is None or metric < run.best["metric"]:
            run.best = {"metric": metric, "step": done, "source": best_source}
            save_model_only(run.best_dir, run.model, run.prep.tokenizer,
                            {"metrics.json": json.dumps({"step": done, "eval": run.last_eval}, indent=1)})
    barrier(run.info)


def _checkpoint(run: Run, done: int) -> None:
    """Rank 0 writes a resumable checkpoint (keeping the last `keep_last`); every rank waits for it."""
    cfg = run.cfg
    if run.info.is_main:
        state = {
            "step": done, "schedule": {"lr": cfg.lr, "min_lr": cfg.min_lr, "warmup_steps": cfg.warmup_steps,
                                       "max_steps": cfg.max_steps},
            "data": run.prep.batches.state_dict(), "best": run.best, "world_size": run.info.world_size,
        }
        save_training_checkpoint(run.ckpt_dir / f"step-{done:08d}", run.model, run.prep.tokenizer, run.optimizer, state)
        prune_checkpoints(run.ckpt_dir, cfg.keep_last)
    barrier(run.info)


def finish(run: Run) -> dict[str, Any]:
    """The run's summary; replicas compared under DDP; the best or last checkpoint copied to export_dir."""
    cfg, info = run.cfg, run.info
    summary: dict[str, Any] = {"steps": cfg.max_steps, "best": run.best, "eval": run.last_eval,
                               "out_dir": str(run.out_dir), "params": run.model.num_parameters(),
                               "arch": run.prep.model_config.arch, "rank": info.rank}
    if info.enabled:
        summary["replicas"] = _check_replicas(run.model, info, run.device, run.out_dir)
    if info.is_main and cfg.export_dir:
        last = list_checkpoints(run.ckpt_dir)[-1][1]
        source = run.best_dir if cfg.export == "best" and run.best_dir.is_dir() else last
        copy_checkpoint(source, Path(cfg.export_dir))
        summary["export"] = {"path": cfg.export_dir, "from": str(source)}
    barrier(info)
    return summary


def _train_step(
    cfg: TrainConfig, net: torch.nn.Module, model: ChiarLM, optimizer: torch.optim.Optimizer, batches: MixedBatches,
    info: DistInfo, device: torch.device, amp: torch.dtype | None, names: list[str],
) -> dict[str, Any]:
    """One optimizer step over `grad_accum` micro-batches; statistics averaged over all ranks."""
    n_counts = model.config.n_layers * len(Operator)
    # packed: [ce, aux, tokens] + counts [layer, operator] + per source [gate_sum, gate_open, gate_n, micro_batches]
    packed = torch.zeros(3 + n_counts + 4 * len(names), dtype=torch.float64)
    for micro in range(cfg.grad_accum):
        batch: Batch = shard_batch(batches.next(), info.rank, info.world_size)
        sync = micro == cfg.grad_accum - 1 or not info.enabled
        ctx = contextlib.nullcontext() if sync else net.no_sync()  # type: ignore[operator]
        autocast = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
        with ctx:
            with autocast:
                out = net(batch.input_ids.to(device), labels=batch.labels.to(device))
            aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=device)
            loss = out.loss + aux
            (loss / cfg.grad_accum).backward()
        packed[0] += float(out.loss.detach())
        packed[1] += float(aux.detach())
        packed[2] += batch.tokens
        packed[3 : 3 + n_counts] += out.routing.counts.detach().cpu().double().flatten()
        gate = out.routing.gate.detach().float().cpu()
        gate = gate[~torch.isnan(gate)]
        k = 3 + n_counts + 4 * names.index(batch.source)
        packed[k] += float(gate.sum())
        packed[k + 1] += int((gate >= GATE_OPEN).sum())
        packed[k + 2] += gate.numel()
        packed[k + 3] += 1
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    packed = all_reduce_sum(packed.to(device), info).cpu()
    world = info.world_size
    ce = float(packed[0]) / (cfg.grad_accum * world)
    aux = float(packed[1]) / (cfg.grad_accum * world)
    counts = packed[3 : 3 + n_counts].view(model.config.n_layers, len(Operator))
    per_source = packed[3 + n_counts :].view(len(names), 4)
    gate_total, gate_open, gate_n = (float(per_source[:, i].sum()) for i in range(3))
    return {
        "loss": ce + aux,
        "ce": ce,
        "aux": aux,
        "ppl": math.exp(min(ce, 50.0)),
        "grad_norm": grad_norm,
        "tokens": int(packed[2]),
        "sources": {n: int(per_source[i, 3]) // world for i, n in enumerate(names) if per_source[i, 3] > 0},
        "attention_share": attention_shares(counts),
        "operator_share": operator_shares(counts),
        "gate": gate_total / gate_n if gate_n else None,
        "gate_open": gate_open / gate_n if gate_n else None,
        "gate_by_source": {n: float(per_source[i, 0] / per_source[i, 2]) for i, n in enumerate(names) if per_source[i, 2] > 0},
    }


def _postfix(record: dict[str, Any], arch: str) -> dict[str, str]:
    post = {
        "loss": f"{record['loss']:.3f}",
        "ppl": f"{record['ppl']:.1f}",
        "tok/s": f"{record['tok_per_s']:.0f}",
        "attn": f"{mean_routed_share(record['attention_share'], arch):.2f}",
    }
    if record["gate"] is not None:
        post["gate"] = f"{record['gate']:.2f}"
    return post


def _check_replicas(model: ChiarLM, info: DistInfo, device: torch.device, out_dir: Path) -> dict[str, Any]:
    """Compare every rank's weight digest; rank 0 writes ddp_check.json and fails if they differ."""
    digest = weights_digest(model)
    raw = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.long, device=device)
    gathered = [torch.zeros_like(raw) for _ in range(info.world_size)]
    torch.distributed.all_gather(gathered, raw)
    digests = [bytes(t.cpu().tolist()).hex() for t in gathered]
    result = {"world_size": info.world_size, "digests": digests, "identical": len(set(digests)) == 1}
    if info.is_main:
        (out_dir / "ddp_check.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    if not result["identical"]:
        raise TrainingError(f"ddp: replica weights diverged across ranks: {digests}")
    return result
