"""The one sampling-parameter policy of every generating route (/v1/generate, /v1/completions,
/v1/chat/completions).

OpenAI's ranges: temperature in [0, 2], top_p in (0, 1], both nullable (null: the default); top_k >= 1
(vLLM's extension) and a seed in [0, 2^53 - 1] (exact in a JSON number). Within them, the values float32
sampling cannot turn into a distribution are refused, on every route alike: a temperature in
(0, MIN_TEMPERATURE) overflows logits / T (0 is greedy), a top_p below MIN_TOP_P underflows to 0. Each is
one field type here, declared once in the OpenAPI document as a component (Temperature, TopP, TopK,
Seed) that every request schema refers to (server/openapi.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, TypeAdapter, WithJsonSchema

MIN_TEMPERATURE = 1e-4  # below it logits / T overflow float32 for large logits; it is greedy in all but name
MIN_TOP_P = 1.2e-38  # the smallest normal float32: smaller masses underflow to 0 in the sampler
MAX_SEED = 2**53 - 1  # the largest integer every JSON parser holds exactly, so clients never round a seed


def _json_number(value: Any) -> Any:
    """JSON Schema's number types: no booleans, no numbers written as strings (in lax and strict models alike)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, str):
        raise ValueError("must be a number, not a string")
    return value


NUMBER = BeforeValidator(_json_number)  # after the constraints, so pydantic writes them as minimum/maximum


def _temperature(value: float) -> float:
    if 0.0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}; smaller values underflow, got {value!r}")
    return value


def _top_p(value: float) -> float:
    if value < MIN_TOP_P:
        raise ValueError(f"must be at least {MIN_TOP_P:g} (smaller values underflow), got {value!r}")
    return value


_RULES: dict[str, tuple[Any, str]] = {
    "Temperature": (Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False), NUMBER, AfterValidator(_temperature),
                              WithJsonSchema({"anyOf": [{"type": "number", "const": 0},
                                                        {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": 2.0}]})],
                    f"0 = greedy, else in [{MIN_TEMPERATURE:g}, 2] (OpenAI's range; smaller values underflow)"),
    "TopP": (Annotated[float, Field(ge=MIN_TOP_P, le=1.0, allow_inf_nan=False), NUMBER, AfterValidator(_top_p)],
             f"nucleus mass in (0, 1] (OpenAI's range); below {MIN_TOP_P:g} it underflows"),
    "TopK": (Annotated[int, Field(ge=1), NUMBER], "sample among the k most likely tokens (extension)"),
    "Seed": (Annotated[int, Field(ge=0, le=MAX_SEED), NUMBER],
             "same seed -> same text, alone or under load; choice j of a request uses seed + j"),
}
# The components /openapi.json declares once; server/openapi.py points every request's field at them.
COMPONENTS: dict[str, dict[str, Any]] = {
    name: {**TypeAdapter(rule).json_schema(), "title": name, "description": text} for name, (rule, text) in _RULES.items()}
FIELDS = {"temperature": "Temperature", "top_p": "TopP", "top_k": "TopK", "seed": "Seed"}  # request field -> component

Temperature = _RULES["Temperature"][0]
TopP = _RULES["TopP"][0]
TopK = _RULES["TopK"][0]
Seed = _RULES["Seed"][0]


@dataclass(frozen=True)
class EngineSampling:
    """What the engine's GenParams take: temperature (0: greedy), top_k and top_p (None: off)."""

    temperature: float
    top_k: int | None
    top_p: float | None


def engine_sampling(temperature: float | None, top_p: float | None, top_k: int | None) -> EngineSampling:
    """A request's sampling fields as the engine runs them (null temperature: 1; null top_p or top_k: off)."""
    return EngineSampling(1.0 if temperature is None else temperature, top_k, top_p)
