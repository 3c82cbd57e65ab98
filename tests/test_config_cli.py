"""Configs (validation, JSON round trip, presets) and the CLI surface."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from rsd.cli import main
from rsd.config import DraftConfig, TokenizerConfig, VLAConfig, from_dict, get_preset, load_json, save_json, to_dict
from rsd.errors import ConfigError

COMMANDS = ("bench-latency", "calibrate", "collect-features", "demo", "eval", "export-draft", "generate-demos", "inspect",
            "inspect-main", "presets", "synthetic-actions", "train-draft", "train-policy", "train-tokenizer")


@pytest.mark.parametrize("name", ["tiny", "openvla-7b"])
def test_presets_round_trip_through_json(name: str, tmp_path) -> None:
    preset = get_preset(name)
    save_json(preset.model, tmp_path / "model.json")
    assert load_json(VLAConfig, tmp_path / "model.json") == preset.model
    assert from_dict(DraftConfig, json.loads(json.dumps(to_dict(preset.draft())))) == preset.draft()


def test_openvla_7b_preset_has_the_real_dimensions() -> None:
    model = get_preset("openvla-7b").model
    assert (model.llm.hidden_size, model.llm.num_layers, model.llm.num_heads, model.llm.intermediate_size, model.llm.vocab_size) == (
        4096, 32, 32, 11008, 32064)
    assert model.image_size == 224 and model.default_exit_layer == 16


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


def test_preset_typo_suggests_the_name() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'tiny'"):
        get_preset("tiyn")


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output
    for command in COMMANDS:
        assert CliRunner().invoke(main, [command, "--help"]).exit_code == 0, command


def test_rsd_errors_become_one_clear_line() -> None:
    result = CliRunner().invoke(main, ["presets", "tiyn"])
    assert result.exit_code == 1 and "ConfigError" in result.output and "Did you mean 'tiny'" in result.output
