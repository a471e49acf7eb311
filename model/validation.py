"""The one wording of a pydantic validation error, shared by the server's settings (`--flag / CHIAR_X:
problem`) and training's configs (`dotted.field: problem`); each front end names the field its own way."""

from __future__ import annotations

from typing import Any

TYPE_WORDS = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
              "string_type": "a string", "list_type": "a list", "model_type": "a mapping", "dict_type": "a mapping",
              "is_instance_of": "a mapping"}
BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def field_path(loc: tuple[int | str, ...], tail: str = "") -> str:
    """('data', 1, 'weight') -> 'data[1].weight' (with `tail` appended as one more dotted part)."""
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    return f"{path}.{tail}" if path and tail else path or tail


def problem(error: Any) -> str:
    """What is wrong with the value, without the field's name: `must be >= 1, got 0`."""
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if "error" in ctx:  # a validator's ValueError: its message is the problem
        return str(ctx["error"])
    if kind in BOUNDS:
        return f"must be {BOUNDS[kind]} {next(iter(ctx.values()))}, got {value}"
    if kind in TYPE_WORDS and value is None:
        return "must not be null"
    if kind in TYPE_WORDS:
        shown = repr(value) if isinstance(value, (str, int, float, bool)) else type(value).__name__
        return f"must be {TYPE_WORDS[kind]}, got {shown}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}, got {value!r}"
    if kind == "missing":
        return "required key is missing"
    if kind == "finite_number":
        return f"must be finite, got {value!r}"
    return str(error["msg"])
