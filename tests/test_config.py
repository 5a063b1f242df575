"""Decoding and server settings are checked field by field, like training settings (tests/test_hostile_input.py)."""

import pytest

from qadapter.config import DecodeConfig, Dial, QAdapterConfig, ServeLimits
from qadapter.errors import ConfigError


@pytest.mark.parametrize(
    "field_name, value",
    [("alpha_0", True), ("alpha_tilde", float("nan")), ("temperature", "0.5"), ("top_p", 0.0), ("max_new_tokens", 2.5), ("seed", -1), ("min_new_tokens", False)],
)
def test_decode_config_refuses_values_that_are_not_numbers_in_range(field_name, value):
    """Decoding settings arrive from the CLI and from server requests: a bool is not 1, a string is not a number."""
    with pytest.raises(ConfigError, match=rf"^{field_name} must be "):
        DecodeConfig(**{field_name: value})


@pytest.mark.parametrize("field_name, value", [("max_request_bytes", 0), ("read_timeout", float("inf")), ("max_stop_chars", True)])
def test_serve_limits_refuse_values_out_of_range(field_name, value):
    with pytest.raises(ConfigError, match=rf"^{field_name} must be "):
        ServeLimits(**{field_name: value})


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(alpha_0=0.0), r"^alpha_0 must be > 0 and <= 10000, got 0.0"),
        (dict(alpha_0=float("inf")), r"^alpha_0 must be > 0 and <= 10000, got inf"),
        (dict(alpha_tilde=-1.0), r"^alpha_tilde must be > 0 and <= 10000, got -1.0"),
        (dict(alpha_tilde=True), r"^alpha_tilde must be a number, got True"),
        (dict(weights={"a": float("nan")}), r"^weights: the weight of adapter 'a' must be a finite number, got nan"),
        (dict(weights={"a": "1"}), r"^weights: the weight of adapter 'a' must be a finite number, got '1'"),
    ],
)
def test_dial_refuses_scales_that_are_not_finite_and_positive(changes, message):
    """The dial is checked once, where it is made: α₀ and α̃ finite and > 0 (never a bool), weights finite."""
    with pytest.raises(ConfigError, match=message):
        Dial(**changes)
    with pytest.raises(ConfigError, match=message):
        DecodeConfig(**changes)  # a decoding config's dial is the same Dial


def test_dial_resolves_blanks_against_the_active_adapter():
    """Blanks take the first (active) adapter's α₀ and α̃; every adapter not named gets weight 1; a set value,
    0.0 included for weights, is kept as given; an unknown adapter name is refused."""
    adapters = {"a": QAdapterConfig(alpha_0=2, alpha_tilde=0.5), "b": QAdapterConfig(alpha_0=7.0, alpha_tilde=3.0)}
    assert Dial().resolve(adapters) == Dial(2, 0.5, {"a": 1.0, "b": 1.0})
    assert Dial(alpha_0=0.25, weights={"b": 0.0}).resolve(adapters) == Dial(0.25, 0.5, {"a": 1.0, "b": 0.0})
    resolved = Dial(alpha_tilde=4.0).resolve(adapters)
    assert resolved.resolve(adapters) == resolved  # resolving twice changes nothing
    assert type(resolved.alpha_0) is int  # kept as configured: cache keys and reports see the same value
    with pytest.raises(ConfigError, match=r"^weights: no adapter named c \(loaded: a, b\)"):
        Dial(weights={"c": 1.0}).resolve(adapters)
