import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model import ChiarConfig, ConfigError, Operator


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"d_model": 100, "n_heads": 3}, "d_model"),
        ({"n_layers": 2}, "n_layers"),
        ({"routing": "magic"}, "routing"),
        ({"arch": "llama"}, "arch"),
        ({"operators": ("attn",)}, "operators"),
        ({"operators": ("dct", "attentoin")}, "operators"),
        ({"operators": ("dct", 3)}, "operators"),
        ({"thresholds": [0.5]}, "thresholds"),
        ({"thresholds": [0.5] * 5 + [float("nan")]}, "thresholds"),
        ({"bands": [[0.6, 0.5]] * 6}, "bands"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"temperature": -1.0}, "temperature"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_attention_share": 1.5}, "target_attention_share"),
        ({"weights_dtype": "int8"}, "weights_dtype"),
        ({"eos_token_id": 9000}, "eos_token_id"),
    ],
)
def test_invalid_values_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ChiarConfig(**changes)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_unknown_key_and_bad_json_rejected() -> None:
    data = ChiarConfig().to_dict() | {"d_modle": 12}
    with pytest.raises(ConfigError, match="d_modle: unknown config key"):
        ChiarConfig.from_dict(data)
    with pytest.raises(ConfigError, match="invalid JSON"):
        ChiarConfig.from_json("{not json")


def test_baseline_allows_two_layers_and_has_no_routing_layers() -> None:
    assert ChiarConfig(arch="baseline", n_layers=2).n_routing_layers == 0


@settings(max_examples=30, deadline=None)
@given(
    d_head=st.sampled_from([2, 4, 8]), heads=st.integers(1, 4), layers=st.integers(3, 8),
    routing=st.sampled_from(["soft", "ste", "threshold", "threshold_reg"]),
    three=st.booleans(), metarouter=st.booleans(), taus=st.floats(0, 1),
)
def test_json_round_trip(d_head: int, heads: int, layers: int, routing: str, three: bool, metarouter: bool, taus: float) -> None:
    config = ChiarConfig(
        d_model=d_head * heads, n_heads=heads, n_layers=layers, routing=routing, metarouter=metarouter,
        operators=("dct", "rbf", "attention") if three else ("dct", "attention"), thresholds=[taus] * (layers - 2),
        extra={"recipe": "test"},
    )
    again = ChiarConfig.from_json(config.to_json())
    assert again == config
    assert json.loads(again.to_json()) == json.loads(config.to_json())


def test_operators_one_spelling_with_the_legacy_alias() -> None:
    """Configs written with "attn" (before the Operator enum) load; they are written back as "attention"."""
    assert [op.label for op in Operator] == ["identity", "dct", "rbf", "attention"]
    assert [int(op) for op in Operator] == [0, 1, 2, 3]  # ids of RoutingInfo.operator, checkpoints and API payloads
    old = ChiarConfig().to_dict() | {"operators": ["dct", "rbf", "attn"]}
    config = ChiarConfig.from_dict(old)
    assert config.operators == (Operator.DCT, Operator.RBF, Operator.ATTENTION) and config.three_operators
    assert json.loads(config.to_json())["operators"] == ["dct", "rbf", "attention"]
    assert ChiarConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown operator 'atn'"):
        Operator.parse("atn")
