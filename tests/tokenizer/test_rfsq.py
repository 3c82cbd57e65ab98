"""RFSQ tokenizer: tokens determine the latent, decoding inverts encoding, bad input fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rsd.config import TokenizerConfig
from rsd.data.stats import ActionStats
from rsd.errors import ShapeError
from rsd.tokenizer import (
    ActionTokenizer,
    dequantize,
    geometric_scales,
    layers_to_tokens,
    residual_quantize,
    tokens_to_layers,
)

CONFIG = TokenizerConfig()


def _chunks(seed: int = 0, batch: int = 16) -> torch.Tensor:
    return torch.rand(batch, CONFIG.chunk_len, CONFIG.action_dim, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


def _random_tokenizer() -> ActionTokenizer:
    torch.manual_seed(0)
    stats = ActionStats.from_actions(np.random.default_rng(0).uniform(-1, 1, size=(512, CONFIG.action_dim)))
    return ActionTokenizer(CONFIG, stats).eval()


def test_decoding_tokens_reproduces_the_training_forward_for_every_c() -> None:
    tokenizer = _random_tokenizer()
    chunks = _chunks()
    tokens = tokenizer.encode(chunks)
    assert tokens.shape == (16, 8, 16, 8) and tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < CONFIG.levels
    with torch.no_grad():
        forward = tokenizer(chunks)
    assert torch.equal(forward.tokens, tokens)
    for c in range(1, CONFIG.num_layers + 1):
        normalised = torch.clamp(forward.reconstructions[c - 1], -1, 1)
        expected = 0.5 * (normalised + 1) * (tokenizer.high - tokenizer.low) + tokenizer.low
        torch.testing.assert_close(tokenizer.decode(tokens, layers=c), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(tokenizer.decode(tokens[..., :c]), expected, atol=1e-6, rtol=0)


def test_latent_is_the_sum_of_scaled_levels() -> None:
    tokenizer = _random_tokenizer()
    chunks = _chunks(1)
    with torch.no_grad():
        latent = torch.tanh(tokenizer.encoder(tokenizer.normalize(chunks)[0]))
    tokens = tokenizer.encode(chunks)
    z_hat = dequantize(tokens, tokenizer.current_scales(), CONFIG.levels)
    assert (z_hat - latent).abs().max() <= geometric_scales(CONFIG)[-1] / (CONFIG.levels - 1) + 1e-6


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1.0, 1.0, allow_nan=False, width=32), min_size=1, max_size=64),
    levels=st.sampled_from([3, 5, 7, 9]),
    layers=st.integers(1, 6),
)
def test_quantiser_indices_in_range_and_residual_within_half_a_step(values: list[float], levels: int, layers: int) -> None:
    config = TokenizerConfig(levels=levels, num_layers=layers, coarse_layers=1)
    scales = geometric_scales(config)
    latent = torch.tensor(values, dtype=torch.float64)
    indices, _ = residual_quantize(latent, scales.double(), levels)
    assert int(indices.min()) >= 0 and int(indices.max()) < levels
    for layer in range(layers):
        partial = dequantize(indices[..., : layer + 1], scales.double(), levels)
        half_step = scales[layer].item() / (levels - 1)
        assert (latent - partial).abs().max().item() <= half_step + 1e-12


def test_layers_round_trip() -> None:
    tokens = torch.randint(0, 7, (3, 8, 16, 8))
    layers = tokens_to_layers(tokens)
    assert layers.shape == (3, 8, 128)
    assert torch.equal(layers[:, 2, 5 * 16 + 3], tokens[:, 5, 3, 2])
    assert torch.equal(layers_to_tokens(layers, 8, 16), tokens)


def test_bad_inputs_raise() -> None:
    tokenizer = _random_tokenizer()
    with pytest.raises(ShapeError, match=r"\[B, 8, 7\]"):
        tokenizer.encode(torch.zeros(2, 8, 6))
    with pytest.raises(ShapeError, match=r"\[B, 8, 7\]"):
        tokenizer.encode(torch.zeros(8, 7))
    with pytest.raises(ShapeError, match="finite"):
        tokenizer.encode(torch.full((1, 8, 7), float("nan")))
    with pytest.raises(ShapeError, match="in \\[0, 7\\)"):
        tokenizer.decode(torch.full((1, 8, 16, 3), 7))
    with pytest.raises(ShapeError, match="1 <= c <= 8"):
        tokenizer.decode(torch.zeros(1, 8, 16, 9, dtype=torch.int64))
    with pytest.raises(ShapeError, match="integer"):
        tokenizer.decode(torch.zeros(1, 8, 16, 3))


def test_out_of_range_actions_are_clipped_and_counted() -> None:
    tokenizer = _random_tokenizer()
    chunks = _chunks()
    chunks[0, 0, 0] = 50.0
    with pytest.warns(UserWarning, match="1 values lay outside"):
        _, clipped = tokenizer.normalize(chunks)
    assert clipped == 1
