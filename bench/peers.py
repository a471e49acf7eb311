"""Peer servers for `bench.server`: a Llama of the served checkpoint's shapes, served by Hugging Face's
`transformers serve --continuous-batching` and (behind --llamacpp) by llama.cpp's `llama-server`.

The Llama has random weights (seeded), fp32, the checkpoint's d_model, layers, heads, d_ff, vocab and
context, tied embeddings, and the checkpoint's own tokenizer (BOS prepended, as our server does), so
all servers see the same token counts. Both peers run offline on loopback from local files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from bench import llamacpp
from loadtests.server_process import LoopbackProcess, free_port


def same_size_llama(checkpoint: Path, out: Path, seed: int = 0) -> Path:
    """save_pretrained a random-weight LlamaForCausalLM (+ tokenizer) of the checkpoint's shapes into out."""
    import torch
    from tokenizers import Tokenizer, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (out / "model.safetensors").is_file():
        return out
    cfg = json.loads((checkpoint / "config.json").read_text())
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    bos, eos, pad = (tok.id_to_token(cfg[k]) for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, cfg["bos_token_id"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    config = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["d_model"], intermediate_size=cfg["d_ff"],
                         num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
                         num_key_value_heads=cfg["n_heads"], max_position_embeddings=cfg["max_seq_len"],
                         rope_theta=cfg["rope_theta"], rms_norm_eps=cfg["norm_eps"], tie_word_embeddings=True,
                         bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"],
                         pad_token_id=cfg["pad_token_id"], torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    model.save_pretrained(part)
    fast.save_pretrained(part)
    part.replace(out)
    return out


def offline_env() -> dict[str, str]:
    """No hub access: the peers load local files only."""
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


class TransformersServe(LoopbackProcess):
    """`transformers serve <dir> --continuous-batching` on CPU, fp32, on loopback."""

    def __init__(self, model_dir: Path, log_path: Path, threads: int | None = None) -> None:
        cli = Path(sys.executable).with_name("transformers")
        self.args = [str(model_dir), "--continuous-batching", "--device", "cpu", "--dtype", "float32",
                     "--host", "127.0.0.1", "--log-level", "warning"]
        port = free_port()
        env = {**offline_env(), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        super().__init__([str(cli), "serve", *self.args, "--port", str(port)], port=port, env=env,
                         log_path=log_path, ready_path="/health")

    def describe(self) -> str:
        """The command line, for the report."""
        return "transformers serve " + " ".join(a if not a.startswith("/") else "<llama dir>" for a in self.args)


class LlamaCppServer(LoopbackProcess):
    """llama.cpp's `llama-server` with one slot per client (-np N, -c N x context)."""

    def __init__(self, build: llamacpp.LlamaCppBuild, gguf: Path, slots: int, context: int, log_path: Path,
                 threads: int | None = None) -> None:
        self.args = ["-np", str(slots), "-c", str(slots * context), "-t", str(threads or os.cpu_count() or 1),
                     "--host", "127.0.0.1", "--no-webui"]
        port = free_port()
        super().__init__([build.server, "-m", str(gguf), *self.args, "--port", str(port)], port=port,
                         log_path=log_path, ready_path="/health")

    def describe(self) -> str:
        """The command line, for the report."""
        return "llama-server -m <f32 gguf> " + " ".join(self.args)
