"""Hugging Face tokenizer files next to a checkpoint's tokenizer.json, and the chat template.

`tokenizer_config.json` + `special_tokens_map.json` make `AutoTokenizer.from_pretrained(checkpoint_dir)`
load the same byte-level BPE the server uses, with its <bos>/<eos>/<pad> ids. The server prepends BOS
itself; `encode(text, add_special_tokens=False)` gives the ids the server puts after it.

Upgrade an existing checkpoint in place (idempotent; keeps a chat_template already there):

    python -m model.hf_tokenizer checkpoints/chiar-small [more dirs ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = "tokenizer_config.json", "special_tokens_map.json"

# The documented plain default for base models (the demo checkpoints): no special tokens, readable
# turns. Generation stops at the next "\nUser:" (DEFAULT_CHAT_STOP) because a base model keeps writing turns.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' or message['role'] == 'developer' -%}{{ message['content'] }}{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}User: {{ message['content'] }}{{ '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}Assistant: {{ message['content'] }}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)
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


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def tokenizer_config(directory: Path, chat_template: str | None = None) -> dict[str, Any]:
    """The tokenizer_config.json content for `directory` (keeps an existing chat_template unless one is given)."""
    config = _read_json(directory / "config.json")
    existing = _read_json(directory / TOKENIZER_CONFIG) if (directory / TOKENIZER_CONFIG).is_file() else {}
    template = chat_template or existing.get("chat_template") or DEFAULT_CHAT_TEMPLATE
    return {
        **existing,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens(directory),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        # what a client may send + generate: the server's BOS takes one position of the context
        "model_max_length": int(config["max_seq_len"]) - 1,
        "chat_template": template,
    }


def write_tokenizer_files(directory: str | Path, chat_template: str | None = None) -> list[Path]:
    """Write tokenizer_config.json and special_tokens_map.json into a checkpoint directory (atomic per file)."""
    directory = Path(directory)
    for name in ("config.json", "tokenizer.json"):
        if not (directory / name).is_file():
            raise TokenizerFilesError(f"{directory / name}: missing file")
    cfg = tokenizer_config(directory, chat_template)
    written = []
    for name, data in ((TOKENIZER_CONFIG, cfg), (SPECIAL_TOKENS_MAP, special_tokens(directory))):
        _write_json_atomic(directory / name, data)
        written.append(directory / name)
    return written


def chat_template(directory: str | Path | None) -> str:
    """The checkpoint's chat template (tokenizer_config.json), else the plain default."""
    if directory is not None:
        path = Path(directory) / TOKENIZER_CONFIG
        if path.is_file():
            template = _read_json(path).get("chat_template")
            if isinstance(template, str) and template.strip():
                return template
    return DEFAULT_CHAT_TEMPLATE


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
