"""The conv vision backbone: spatial-softmax keypoints, token shapes, and PrismaticVLA built on it."""

from __future__ import annotations

import json

import pytest
import torch

from rsd.config import ConvConfig, VLAConfig, from_dict, to_dict
from rsd.errors import ConfigError, ShapeError
from rsd.models.conv import ConvBackbone, InstructionSummary, coordinate_grid, sinusoidal_positions, spatial_softmax
from rsd.models.vla import PrismaticVLA
from rsd.presets import get_preset


def test_spatial_softmax_points_at_the_peak():
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, 1, 3] = 50.0  # row 1, column 3
    maps[0, 1, 3, 0] = 50.0  # row 3, column 0
    expected, activation = spatial_softmax(maps)
    assert torch.allclose(expected[0, 0], torch.tensor([0.75, -0.25]), atol=1e-4)  # x right, y down
    assert torch.allclose(expected[0, 1], torch.tensor([-0.75, 0.75]), atol=1e-4)
    assert torch.allclose(activation[0, :, 0], torch.tensor([50.0, 50.0]), atol=1e-3)
    assert coordinate_grid(4, maps).shape == (16, 2)


@pytest.mark.parametrize("tokens, count", [("keypoints", 16), ("grid", 64)])
def test_token_shapes(tokens, count):
    backbone = ConvBackbone(ConvConfig(img_size=64, tokens=tokens), condition_dim=8)
    prompt, mask = torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
    out = backbone(torch.randn(3, 3, 64, 64), prompt, mask)
    assert out.shape == (3, count, backbone.embed_dim) and backbone.num_patches == count
    assert torch.isfinite(out).all()
    with pytest.raises(ShapeError, match=r"\[B, 3, 64, 64\]"):
        backbone(torch.randn(3, 3, 32, 32), prompt, mask)
    with pytest.raises(ShapeError, match="instruction"):
        backbone(torch.randn(3, 3, 64, 64))
    with pytest.raises(ShapeError, match="instruction"):
        backbone(torch.randn(3, 3, 64, 64), prompt, mask[:, :4])


def test_film_starts_as_the_identity_and_then_conditions_the_tokens():
    torch.manual_seed(0)
    with_film = ConvBackbone(ConvConfig(img_size=64), condition_dim=8)
    without = ConvBackbone(ConvConfig(img_size=64, film=False))
    without.load_state_dict({k: v for k, v in with_film.state_dict().items() if not k.startswith(("film.", "summary."))})
    pixels, mask = torch.randn(2, 3, 64, 64), torch.ones(2, 4, dtype=torch.bool)
    assert torch.allclose(with_film(pixels, torch.randn(2, 4, 8), mask), without(pixels), atol=1e-6)
    for layer in with_film.film:
        torch.nn.init.normal_(layer.weight, std=0.1)
    a, b = with_film(pixels, torch.zeros(2, 4, 8), mask), with_film(pixels, torch.ones(2, 4, 8), mask)
    assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ConfigError, match="conditioning width"):
        ConvBackbone(ConvConfig(img_size=64), condition_dim=0)


@pytest.mark.parametrize("values", ["words+positions", "words", "slots"])
def test_film_summary_tells_word_order_apart_and_ignores_padding(values):
    """"red next to blue" and "blue next to red" have the same mean word embedding; the summary must differ."""
    torch.manual_seed(0)
    summary = InstructionSummary(text_dim=8, queries=2, values=values)
    red, blue, to = torch.randn(3, 8)
    mask = torch.ones(1, 3, dtype=torch.bool)
    forward, backward = summary(torch.stack([red, to, blue])[None], mask), summary(torch.stack([blue, to, red])[None], mask)
    assert forward.shape == (1, 16) and not torch.allclose(forward, backward, atol=1e-4)
    padded = summary(torch.stack([red, to, blue, torch.randn(8) * 100])[None], torch.tensor([[True, True, True, False]]))
    assert torch.allclose(forward, padded, atol=1e-5)


def test_word_values_average_only_the_words_with_weights_steered_by_position():
    torch.manual_seed(0)
    words_only, with_positions = InstructionSummary(8, 2, "words"), InstructionSummary(8, 2)
    with_positions.load_state_dict(words_only.state_dict())
    prompt, mask = torch.randn(1, 4, 8), torch.tensor([[True, True, True, False]])
    positions = sinusoidal_positions(4, 8, prompt)
    scores = torch.einsum("ge,te->gt", words_only.queries, words_only.keys(prompt[0] + positions)) / 8**0.5
    weights = torch.softmax(scores[:, :3], dim=-1)  # [G, 3] over the real words
    assert torch.allclose(words_only(prompt, mask)[0], (weights @ prompt[0, :3]).flatten(), atol=1e-6)
    assert torch.allclose(with_positions(prompt, mask)[0], (weights @ (prompt[0, :3] + positions[:3])).flatten(), atol=1e-6)


def test_slots_are_the_first_words_with_zeros_past_the_end_and_no_attention():
    torch.manual_seed(0)
    summary = InstructionSummary(8, 4, "slots")
    assert list(summary.parameters()) == []  # nothing to learn, nothing to decay into a uniform average
    prompt, mask = torch.randn(2, 3, 8), torch.tensor([[True, True, True], [True, True, False]])
    slots = summary(prompt, mask).reshape(2, 4, 8)
    assert torch.equal(slots[0, :3], prompt[0]) and torch.equal(slots[1, :2], prompt[1, :2])
    assert not slots[0, 3:].any() and not slots[1, 2:].any()  # past each instruction's end
    longer = torch.randn(1, 6, 8)
    assert torch.equal(summary(longer, torch.ones(1, 6, dtype=torch.bool)).reshape(4, 8), longer[0, :4])  # words past 4 unseen


def test_film_values_are_checked_and_old_configs_keep_words_and_positions():
    with pytest.raises(ConfigError, match="film_values"):
        ConvConfig(film_values="positions")
    assert get_preset("tiny").model.vision[0].film_values == "slots"
    old = {k: v for k, v in to_dict(ConvConfig()).items() if k != "film_values"}  # a policy.json written before the option
    assert from_dict(ConvConfig, old).film_values == "words+positions"


def test_config_round_trip_picks_the_right_backbone_class():
    config = get_preset("tiny").model
    assert isinstance(config.vision[0], ConvConfig)
    again = from_dict(VLAConfig, json.loads(json.dumps(to_dict(config))))
    assert again == config
    vit = get_preset("tiny-vit").model
    assert from_dict(VLAConfig, json.loads(json.dumps(to_dict(vit)))) == vit
    with pytest.raises(ConfigError, match="exactly one of"):
        from_dict(VLAConfig, {**to_dict(config), "vision": [{"bogus": 1}]})
    with pytest.raises(ConfigError, match="tokens"):
        ConvConfig(tokens="patches")


def test_segmented_forward_and_save_load_with_the_conv_backbone(tmp_path):
    torch.manual_seed(0)
    vla = PrismaticVLA(get_preset("tiny").model).eval()
    inputs = vla.random_inputs(batch=2, prompt_len=9)
    with torch.no_grad():
        full = vla(inputs)
        for k in (0, 3, 6):
            assert torch.allclose(vla.resume(vla.prefix(inputs, k)), full, atol=1e-5)
    vla.save_pretrained(tmp_path)
    again = PrismaticVLA.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(inputs), full)
