"""Decoding and server settings are checked field by field, like training settings (tests/test_hostile_input.py)."""

import pytest

from qadapter.config import DecodeConfig, ServeLimits
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
