"""Named presets: JSON round trip, the real OpenVLA-7B dimensions, a typo's suggestion, the text LM presets."""

from __future__ import annotations

import json

import pytest

from rsd.config import DraftConfig, TextLMConfig, VLAConfig, from_dict, load_json, save_json, to_dict
from rsd.errors import ConfigError
from rsd.presets import get_preset, get_text_lm_preset


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


def test_preset_typo_suggests_the_name() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'tiny'"):
        get_preset("tiyn")


def test_text_lm_presets_round_trip_and_suggest_a_name(tmp_path) -> None:
    config = get_text_lm_preset("qwen3-tiny")
    assert (config.num_layers, config.hidden_size) == (28, 128)  # Qwen3-0.6B's depth: the seed's layer set applies
    save_json(config, tmp_path / "lm.json")
    assert load_json(TextLMConfig, tmp_path / "lm.json") == config
    with pytest.raises(ConfigError, match="Did you mean 'qwen3-tiny'"):
        get_text_lm_preset("qwen3-tiyn")
