"""Hugging Face tokenizer files next to a checkpoint's tokenizer.json, and the chat template.

The files say what the server does, so `AutoTokenizer.from_pretrained(checkpoint_dir)` with default
arguments gives the server's ids:
- tokenizer.json gets a TemplateProcessing post-processor that puts BOS first (what transformers 4 and 5
  and the `tokenizers` library all apply by default), so `tok(text).input_ids` == `/tokenize`'s ids;
- tokenizer_config.json: class PreTrainedTokenizerFast, <bos>/<eos>/<pad>, `add_bos_token: true`,
  `model_max_length` (context - 1), and a chat template that starts with `{{ bos_token }}`, so
  `apply_chat_template` gives `/tokenize`'s ids of the same messages (the server drops the rendered
  BOS string and puts the real BOS id in its place);
- special_tokens_map.json.
`encode(text, add_special_tokens=False)` gives the ids the server puts after BOS.

`save_checkpoint` writes them; upgrade an older checkpoint in place (idempotent; keeps a chat_template
already there, upgrading only the old built-in default):

    python -m model.hf_tokenizer checkpoints/chiar-small [more dirs ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .storage import atomic_write_text

TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = "tokenizer_config.json", "special_tokens_map.json"

# The documented plain default for base models (the demo checkpoints): BOS, then readable turns.
# Generation stops at the next "\nUser:" (DEFAULT_CHAT_STOP) because a base model keeps writing turns.
_TURNS = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' or message['role'] == 'developer' -%}{{ message['content'] }}{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}User: {{ message['content'] }}{{ '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}Assistant: {{ message['content'] }}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)
DEFAULT_CHAT_TEMPLATE = "{{- bos_token -}}" + _TURNS
# The default written before the template carried BOS (same turns): upgraded in place, never kept.
LEGACY_DEFAULT_CHAT_TEMPLATE = _TURNS
DEFAULT_CHAT_STOP = ["\nUser:"]


class TokenizerFilesError(ValueError):
    """The checkpoint directory cannot get HF tokenizer files; the message names the file."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerFilesError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerFilesError(f"{path}: must be a JSON object")
    return data


def special_tokens(directory: Path) -> dict[str, str]:
    """{'bos_token': '<bos>', ...} from config.json's ids and tokenizer.json's added tokens."""
    config = _read_json(directory / "config.json")
    tokenizer = _read_json(directory / "tokenizer.json")
    by_id = {t["id"]: t["content"] for t in tokenizer.get("added_tokens", [])}
    vocab = (tokenizer.get("model") or {}).get("vocab") or {}
    by_id.update({i: tok for tok, i in vocab.items() if i not in by_id} if isinstance(vocab, dict) else {})
    out = {}
    for name in ("bos", "eos", "pad"):
        token_id = config.get(f"{name}_token_id")
        if token_id is None:
            continue
        if token_id not in by_id:
            raise TokenizerFilesError(f"{directory / 'tokenizer.json'}: no token with id {token_id} ({name}_token_id)")
        out[f"{name}_token"] = by_id[token_id]
    return out


def upgraded_template(template: str | None) -> str:
    """A checkpoint's chat template as the files should hold it: the default when absent or the old default."""
    if not isinstance(template, str) or not template.strip() or template == LEGACY_DEFAULT_CHAT_TEMPLATE:
        return DEFAULT_CHAT_TEMPLATE
    return template


def tokenizer_config(directory: Path, chat_template: str | None = None) -> dict[str, Any]:
    """The tokenizer_config.json content for `directory` (keeps an existing chat_template unless one is given)."""
    config = _read_json(directory / "config.json")
    existing = _read_json(directory / TOKENIZER_CONFIG) if (directory / TOKENIZER_CONFIG).is_file() else {}
    return {
        **existing,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens(directory),
        "add_bos_token": True,  # the server puts BOS first; tokenizer.json's post-processor does the same
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        # what a client may send + generate: the server's BOS takes one position of the context
        "model_max_length": int(config["max_seq_len"]) - 1,
        "chat_template": chat_template or upgraded_template(existing.get("chat_template")),
    }


def bos_post_processor(bos: str, bos_id: int) -> dict[str, Any]:
    """tokenizer.json's TemplateProcessing that puts BOS first, as transformers' `add_bos_token` builds it."""
    def special(type_id: int) -> dict[str, Any]:
        return {"SpecialToken": {"id": bos, "type_id": type_id}}

    def sequence(name: str, type_id: int) -> dict[str, Any]:
        return {"Sequence": {"id": name, "type_id": type_id}}

    return {"type": "TemplateProcessing", "single": [special(0), sequence("A", 0)],
            "pair": [special(0), sequence("A", 0), special(1), sequence("B", 1)],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _with_bos(directory: Path) -> dict[str, Any] | None:
    """tokenizer.json with the BOS post-processor, or None when it already has it."""
    path = directory / "tokenizer.json"
    data = _read_json(path)
    bos_id = _read_json(directory / "config.json").get("bos_token_id")
    if bos_id is None:
        return None  # no BOS: nothing to put first
    wanted = bos_post_processor(special_tokens(directory)["bos_token"], int(bos_id))
    current = data.get("post_processor")
    if current == wanted:
        return None
    if current is None:
        data["post_processor"] = wanted
    elif "TemplateProcessing" in json.dumps(current):
        raise TokenizerFilesError(f"{path}: has its own TemplateProcessing post-processor; remove it or put BOS first in it")
    else:  # e.g. ByteLevel offset trimming: keep it, then add BOS
        data["post_processor"] = {"type": "Sequence", "processors": [current, wanted]}
    return data


def write_tokenizer_files(directory: str | Path, chat_template: str | None = None) -> list[Path]:
    """Write tokenizer_config.json and special_tokens_map.json into a checkpoint directory, and put the BOS
    post-processor into its tokenizer.json (atomic per file; a file already right is left alone)."""
    directory = Path(directory)
    for name in ("config.json", "tokenizer.json"):
        if not (directory / name).is_file():
            raise TokenizerFilesError(f"{directory / name}: missing file")
    files = [(TOKENIZER_CONFIG, tokenizer_config(directory, chat_template)), (SPECIAL_TOKENS_MAP, special_tokens(directory))]
    tokenizer = _with_bos(directory)
    if tokenizer is not None:
        files.insert(0, ("tokenizer.json", tokenizer))
    for name, data in files:
        atomic_write_text(directory / name, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return [directory / name for name, _ in files]


def chat_template(directory: str | Path | None) -> str:
    """The checkpoint's chat template (tokenizer_config.json; the old default read as the new one), else the default."""
    if directory is not None:
        path = Path(directory) / TOKENIZER_CONFIG
        if path.is_file():
            return upgraded_template(_read_json(path).get("chat_template"))
    return DEFAULT_CHAT_TEMPLATE


def stale_files(directory: str | Path) -> list[str]:
    """Names of the HF tokenizer files that `write_tokenizer_files` would change (missing or out of date)."""
    directory = Path(directory)
    stale = [] if _with_bos(directory) is None else ["tokenizer.json"]
    for name, data in ((TOKENIZER_CONFIG, tokenizer_config(directory)), (SPECIAL_TOKENS_MAP, special_tokens(directory))):
        if not (directory / name).is_file() or _read_json(directory / name) != data:
            stale.append(name)
    return stale


def hf_settings(directory: str | Path) -> dict[str, Any]:
    """What the checkpoint's tokenizer_config.json holds once upgraded (what /tokenizer_info reports)."""
    return tokenizer_config(Path(directory))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.hf_tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint directories to upgrade in place")
    parser.add_argument("--chat-template", type=Path, help="a Jinja file to store as chat_template")
    args = parser.parse_args(argv)
    template = args.chat_template.read_text(encoding="utf-8") if args.chat_template else None
    for directory in args.checkpoints:
        try:
            for path in write_tokenizer_files(directory, template):
                print(f"wrote {path}")
        except TokenizerFilesError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
