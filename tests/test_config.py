"""Configs: JSON round trip, unknown or missing keys refused, invalid fields named with their allowed values."""

from __future__ import annotations

import dataclasses

import pytest

from rsd.config import DraftConfig, TokenizerConfig, from_dict, to_dict
from rsd.errors import ConfigError
from rsd.presets import get_preset


def test_unknown_or_missing_keys_are_refused() -> None:
    data = to_dict(TokenizerConfig())
    with pytest.raises(ConfigError, match="unknown keys 'levelz'.*did you mean 'levels'"):
        from_dict(TokenizerConfig, {**data, "levelz": 7})
    with pytest.raises(ConfigError, match="missing keys"):
        from_dict(DraftConfig, {"hidden_size": 128})


def test_invalid_fields_name_the_field_and_allowed_values() -> None:
    with pytest.raises(ConfigError, match="TokenizerConfig.levels: expected an odd int >= 3"):
        TokenizerConfig(levels=6)
    with pytest.raises(ConfigError, match="coarse_layers"):
        TokenizerConfig(coarse_layers=9)
    with pytest.raises(ConfigError, match="exit_layer"):
        dataclasses.replace(get_preset("tiny").model, exit_layer=7)
