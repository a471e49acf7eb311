"""The small JSON files of a checkpoint that Hugging Face clients read: tokenizer_config.json and
special_tokens_map.json (optional; model/hf_tokenizer.py writes them). `load_checkpoint` checks them,
so a file that is not a JSON object of the expected shape gets the same one-line error as a bad
config.json (file: problem) instead of failing later in the server's chat route or in a client.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint_guard import GuardError

MAX_JSON_BYTES = 2**24  # a chat template is a few KB; refuse anything absurd before reading it
OPTIONAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")
TOKEN_FIELDS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")
BOOL_FIELDS = ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces", "legacy")


def read_json_object(path: Path, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in `path`; GuardError(path, problem) for a non-regular file, a size over `limit`,
    bytes that are not UTF-8 JSON, or JSON that is not an object."""
    if path.is_symlink() and not path.exists():
        raise GuardError(path, "dangling or looping symlink")
    if not path.is_file():
        raise GuardError(path, "not a regular file (a FIFO, device or directory)")
    size = path.stat().st_size
    if size > limit:
        raise GuardError(path, f"{size} bytes, over the {limit}-byte limit for this file")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise GuardError(path, f"invalid JSON: not UTF-8 text (byte {exc.start})") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise GuardError(path, f"invalid JSON: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise GuardError(path, f"invalid JSON shape: must be an object, got {type(data).__name__}")
    return data


def _token_ok(value: Any) -> bool:
    """A special token as HF writes it: a string, an AddedToken object with string content, or null."""
    return value is None or isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str))


def _tokenizer_config_problem(data: dict[str, Any]) -> str | None:
    template = data.get("chat_template")
    if template is not None and not isinstance(template, str) and not (
            isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template)):
        return "chat_template: must be a string (or a list of {name, template}), got " + type(template).__name__
    length = data.get("model_max_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, (int, float))):
        return f"model_max_length: must be a number, got {type(length).__name__}"
    for name in TOKEN_FIELDS:
        if not _token_ok(data.get(name)):
            return f"{name}: must be a string or {{\"content\": string}}, got {type(data[name]).__name__}"
    for name in BOOL_FIELDS:
        if name in data and not isinstance(data[name], bool):
            return f"{name}: must be true or false, got {type(data[name]).__name__}"
    if "tokenizer_class" in data and not isinstance(data["tokenizer_class"], str):
        return f"tokenizer_class: must be a string, got {type(data['tokenizer_class']).__name__}"
    return None


def _special_tokens_problem(data: dict[str, Any]) -> str | None:
    for name, value in data.items():
        values = value if isinstance(value, list) else [value]
        if not all(_token_ok(v) for v in values):
            return f"{name}: must be a string or {{\"content\": string}} (or a list of them)"
    return None


def check_hf_files(directory: Path) -> None:
    """tokenizer_config.json and special_tokens_map.json, where present: JSON objects of the expected shape."""
    for name, problem_of in zip(OPTIONAL_FILES, (_tokenizer_config_problem, _special_tokens_problem)):
        path = directory / name
        if not (path.exists() or path.is_symlink()):
            continue
        problem = problem_of(read_json_object(path))
        if problem is not None:
            raise GuardError(path, f"invalid JSON shape: {problem}")
