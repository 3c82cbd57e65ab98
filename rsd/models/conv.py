"""A small conv vision backbone for from-scratch visuomotor policies: GroupNorm convs → keypoint or grid tokens.

Small policies trained from scratch on a few hundred demonstrations localise objects far better with a conv
trunk and spatial-softmax keypoints (robomimic's `VisualCore`, Diffusion Policy) than with a ViT of the same
size: a convolution sees colour and edges at every pixel from the first step, and the spatial softmax turns a
feature map into the expected image coordinates of what it responds to. GroupNorm instead of BatchNorm keeps
training and inference identical at batch 1.

With `film` each stage's features are scaled and shifted per channel by a linear map of an instruction summary
(FiLM, as RT-1 and BC-Z condition their conv trunks on language): the trunk can then light up "the red block"
rather than every block, so the keypoints point at what the instruction names. The summary is order-aware
(`InstructionSummary`: learned queries attend over the words with their positions): a mean of word embeddings
cannot tell "put the red block next to the blue block" from "put the blue block next to the red block". The
FiLM maps start at zero, so an untrained FiLM is the identity.

What the summary averages (`ConvConfig.film_values`): the position codes always steer the attention (they are in
the keys), so each query can pick "the first colour" or "the last one". With "words+positions" they are also in the
averaged values, where they dwarf freshly initialised word embeddings (norm 8 against about 0.2) and are nearly
the same for every instruction. FiLM then first learns from the template, and its queries can lock onto the word that
names the task family ("plate"). A run measured this way had 0.03-0.04 of the attention on "red", and its keypoints
did not move when the named colour changed. That run never left its localisation plateau. With "words" only the
words are averaged, so the summary is the instruction's content from the first step. Its queries can still decay to
a uniform average (a run whose two queries read every word alike never grounded the colour). With "slots" (the
`tiny` preset) there is no attention: slot g is the g-th word, so "the colour word at position 3" reaches FiLM
through its own weights from the first step; words past `film_queries` reach only the LLM.

Tokens (`ConvConfig.tokens`), each a feature vector `[Dv]` the projector maps into the LLM:
- "keypoints": K maps → softmax over space → per map the expected `(x, y)` in [-1, 1] (x right, y down), their
  Fourier features, the expected activation (how strongly the map fires) and a learned identity embedding.
- "grid": the feature map average-pooled to `grid_size²` cells, each with its cell's coordinate features.

Usage:
    backbone = ConvBackbone(ConvConfig(img_size=64), condition_dim=128)
    tokens = backbone(pixels, prompt, mask)   # pixels [B, 3, 64, 64] normalised, prompt [B, T, 128], mask [B, T] -> [B, P, Dv]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rsd.config import ConvConfig
from rsd.errors import ConfigError, ShapeError


def _conv_block(cin: int, cout: int, stride: int, groups: int) -> nn.Sequential:
    """3×3 conv → GroupNorm → ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True))


def fourier_features(coords: torch.Tensor, bands: int) -> torch.Tensor:
    """`[..., 2]` coordinates in [-1, 1] → `[..., 2 + 4 * bands]`: the coordinates and sin/cos at octave frequencies."""
    freqs = math.pi * (2.0 ** torch.arange(bands, dtype=coords.dtype, device=coords.device))
    angles = (coords.unsqueeze(-1) * freqs).flatten(-2)
    return torch.cat([coords, angles.sin(), angles.cos()], dim=-1)


def coordinate_grid(side: int, like: torch.Tensor) -> torch.Tensor:
    """Cell-centre coordinates `[side², 2]` (x right, y down, in [-1, 1]) in row-major order, on `like`'s device/dtype."""
    centres = (torch.arange(side, device=like.device, dtype=like.dtype) + 0.5) * (2.0 / side) - 1.0
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs, ys], dim=-1).reshape(-1, 2)


def spatial_softmax(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoints of square maps `[B, K, h, h]`: expected `(x, y)` `[B, K, 2]` under a softmax over space, and the
    expected activation `[B, K, 1]` (how strongly each map fires where it points)."""
    attention = torch.softmax(maps.flatten(2).float(), dim=-1).to(maps.dtype)  # [B, K, h*h]
    expected = attention @ coordinate_grid(maps.shape[-1], maps)
    return expected, (attention * maps.flatten(2)).sum(-1, keepdim=True)


def sinusoidal_positions(length: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """Transformer sine/cosine position codes `[T, E]` (no length limit), in `like`'s dtype and device."""
    position = torch.arange(length, device=like.device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, device=like.device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    codes = torch.zeros(length, dim, device=like.device)
    codes[:, 0::2] = torch.sin(position * frequency)
    codes[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return codes.to(like.dtype)


class InstructionSummary(nn.Module):
    """Order-aware instruction summary `[B, G * E]`: G learned queries attend over the words plus their positions and
    average the words (`values="words"`) or the words plus their positions; with `values="slots"` the G slots are
    the first G words themselves (zeros past the instruction's end)."""

    def __init__(self, text_dim: int, queries: int, values: str = "words+positions") -> None:
        super().__init__()
        self.count = queries
        self.values = values
        if values != "slots":
            self.queries = nn.Parameter(torch.randn(queries, text_dim) * text_dim**-0.5)
            self.keys = nn.Linear(text_dim, text_dim)

    def forward(self, prompt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Summary `[B, G * E]` of token embeddings `[B, T, E]` (mask `[B, T]`, true at real tokens)."""
        if self.values == "slots":  # slot g is word g itself: no attention that could learn to skip the colour words
            slots = (prompt * mask.unsqueeze(-1).to(prompt.dtype))[:, : self.count]
            return F.pad(slots, (0, 0, 0, self.count - slots.shape[1])).flatten(1)
        words = prompt + sinusoidal_positions(prompt.shape[1], prompt.shape[2], prompt)
        scores = torch.einsum("ge,bte->bgt", self.queries.to(words.dtype), self.keys(words)) / words.shape[-1] ** 0.5
        weights = torch.softmax(scores.masked_fill(~mask.bool().unsqueeze(1), float("-inf")), dim=-1)
        return (weights @ (prompt if self.values == "words" else words)).flatten(1)


class ConvBackbone(nn.Module):
    """Normalised images `[B, 3, S, S]` → visual tokens `[B, P, Dv]` (P keypoints or grid cells)."""

    def __init__(self, config: ConvConfig, condition_dim: int = 0) -> None:
        super().__init__()
        self.config = config
        c0, c1, c2, c3 = config.channels
        self.stages = nn.ModuleList([
            _conv_block(3, c0, 2, config.groups),
            _conv_block(c0, c1, 2, config.groups),
            _conv_block(c1, c2, 1, config.groups),
            _conv_block(c2, c3, 1, config.groups),
        ])
        if config.film and condition_dim <= 0:
            raise ConfigError(f"ConvConfig.film: expected a conditioning width > 0 (the LLM's), got {condition_dim}.")
        self.summary = InstructionSummary(condition_dim, config.film_queries, config.film_values) if config.film else None
        film_dim = config.film_queries * condition_dim
        self.film = nn.ModuleList(nn.Linear(film_dim, 2 * c) for c in config.channels) if config.film else None
        if self.film is not None:
            for layer in self.film:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        coord_dim = 2 + 4 * config.fourier_bands
        if config.tokens == "keypoints":
            self.keypoint_maps = nn.Conv2d(c3, config.num_keypoints, 1)
            self.identity = nn.Parameter(torch.randn(config.num_keypoints, c3) * 0.1)
            self.num_patches = config.num_keypoints
            self.embed_dim = coord_dim + 1 + c3
        else:
            self.num_patches = config.grid_size**2
            self.embed_dim = c3 + coord_dim

    def forward(self, pixels: torch.Tensor, prompt: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Visual tokens `[B, P, Dv]` for normalised images `[B, 3, S, S]`; with FiLM also the instruction's token
        embeddings `[B, T, E]` and their mask `[B, T]` (true at real tokens)."""
        size = self.config.img_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ShapeError(f"ConvBackbone: expected images [B, 3, {size}, {size}], got {tuple(pixels.shape)}.")
        if self.summary is not None:
            if (prompt is None or prompt_mask is None or prompt.ndim != 3 or prompt.shape[0] != pixels.shape[0]
                    or tuple(prompt_mask.shape) != tuple(prompt.shape[:2])):
                got = None if prompt is None else (tuple(prompt.shape), None if prompt_mask is None else tuple(prompt_mask.shape))
                raise ShapeError(f"ConvBackbone: expected the instruction [{pixels.shape[0]}, T, E] and its mask [{pixels.shape[0]}, T], got {got}.")
            condition = self.summary(prompt, prompt_mask)  # [B, G * E]
        features = pixels
        for index, stage in enumerate(self.stages):
            features = stage(features)
            if self.film is not None:
                scale, shift = self.film[index](condition).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
                features = features * (1.0 + scale) + shift  # [B, C, h, w]
        bands = self.config.fourier_bands
        if self.config.tokens == "grid":
            g = self.config.grid_size
            cells = F.adaptive_avg_pool2d(features, g).flatten(2).transpose(1, 2)  # [B, g², C]
            coords = fourier_features(coordinate_grid(g, cells), bands).expand(cells.shape[0], -1, -1)
            return torch.cat([cells, coords], dim=-1)
        maps = self.keypoint_maps(features)  # [B, K, h, w]
        expected, activation = spatial_softmax(maps)
        identity = self.identity.to(maps.dtype).expand(maps.shape[0], -1, -1)
        return torch.cat([fourier_features(expected, bands), activation, identity], dim=-1)
