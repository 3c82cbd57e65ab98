"""The residual-FSQ (RFSQ) action tokenizer: action chunks `[B, H, A]` ↔ tokens `[B, H, d, L]`.

Part of the design in docs/architecture.md. Actions are normalised per dimension to [-1, 1] with the dataset's
q01/q99 bounds, a per-step MLP (A → 64 → d, tanh) maps them to a latent in [-1, 1]^d, and L residual FSQ layers quantise that latent:
layer l rounds the residual to V levels at scale `s_l`,

    idx_l = round(clamp(r_l / s_l, -1, 1) * (V-1)/2) + (V-1)/2,   r_{l+1} = r_l - s_l * (idx_l - (V-1)/2) / ((V-1)/2).

With the default geometric scales (`s_0 = 1`, `s_{l+1} = s_l / (V - 1)`) the residual after layer l is at most
half a step of layer l, which is exactly the range of layer l+1, so nothing is ever clipped after layer 0.
The latent is recoverable from the tokens alone — `z_hat = sum_l s_l * (idx_l - (V-1)/2) / ((V-1)/2)` — so
decoding `encode(x)` reproduces the training-time reconstruction exactly (a tokenizer that throws away a
per-vector mean/std cannot; docs/pitfalls.md #3). Decoding with the first c layers treats the rest
as the zero level.

Usage:
    tokenizer = ActionTokenizer(TokenizerConfig(), stats)      # stats: rsd.data.stats.ActionStats
    tokens = tokenizer.encode(actions)                          # actions [B, H, A] -> int64 [B, H, d, L]
    chunk = tokenizer.decode(tokens[..., :3])                   # first C=3 layers -> [B, H, A]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rsd.config import TokenizerConfig, from_dict, to_dict
from rsd.data.stats import ActionStats, normalize
from rsd.errors import ShapeError
from rsd.io import load_artifact, load_strict, save_artifact

TOKENIZER_FILE = "tokenizer"


def geometric_scales(config: TokenizerConfig) -> torch.Tensor:
    """Per-layer scales `[L]`: `s_0 = 1`, `s_{l+1} = s_l / (V - 1)`."""
    return torch.tensor([float(config.levels - 1) ** -layer for layer in range(config.num_layers)], dtype=torch.float32)


def residual_quantize(latent: torch.Tensor, scales: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `latent [..., d]` layer by layer; return indices `[..., d, L]` (int64) and `z_hat [..., d]`."""
    half = (levels - 1) / 2
    residual = latent
    z_hat = torch.zeros_like(latent)
    indices = []
    for scale in scales:
        level = torch.round(torch.clamp(residual / scale, -1.0, 1.0) * half)
        value = scale * level / half
        z_hat = z_hat + value
        residual = residual - value
        indices.append((level + half).to(torch.int64))
    return torch.stack(indices, dim=-1), z_hat


def dequantize(tokens: torch.Tensor, scales: torch.Tensor, levels: int) -> torch.Tensor:
    """Latent `[..., d]` from indices `[..., d, c]` with the first c scales (the later layers at the zero level)."""
    half = (levels - 1) / 2
    values = (tokens.to(scales.dtype) - half) / half
    return (values * scales[: tokens.shape[-1]]).sum(dim=-1)


def tokens_to_layers(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens `[B, H, d, c]` → per-layer rows `[B, c, H*d]` (the layout heads and drafts predict)."""
    if tokens.ndim != 4:
        raise ShapeError(f"tokens_to_layers: expected tokens [B, H, d, c], got {tuple(tokens.shape)}.")
    batch, steps, latent, layers = tokens.shape
    return tokens.permute(0, 3, 1, 2).reshape(batch, layers, steps * latent)


def layers_to_tokens(layers: torch.Tensor, chunk_len: int, latent_dim: int) -> torch.Tensor:
    """Per-layer rows `[B, c, H*d]` → tokens `[B, H, d, c]` (inverse of `tokens_to_layers`)."""
    if layers.ndim != 3 or layers.shape[2] != chunk_len * latent_dim:
        raise ShapeError(f"layers_to_tokens: expected [B, c, {chunk_len * latent_dim}], got {tuple(layers.shape)}.")
    batch, count, _ = layers.shape
    return layers.reshape(batch, count, chunk_len, latent_dim).permute(0, 2, 3, 1)


class StepMLP(nn.Sequential):
    """The per-step MLP `in → hidden → out` (GELU) used by the encoder and the decoder."""

    def __init__(self, inputs: int, hidden: int, outputs: int) -> None:
        super().__init__(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, outputs))


class TokenDecoder(nn.Module):
    """Tokens `[B, H, d, c]` (int64) → un-normalised actions `[B, H, A]`: the exportable decode graph."""

    def __init__(self, tokenizer: ActionTokenizer) -> None:
        super().__init__()
        self.levels = tokenizer.config.levels
        self.mlp = tokenizer.decoder
        self.register_buffer("scales", tokenizer.current_scales().detach().clone())
        self.register_buffer("low", tokenizer.low.clone())
        self.register_buffer("high", tokenizer.high.clone())
        self.register_buffer("mask", tokenizer.mask.clone())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Actions `[B, H, A]` in dataset units for tokens `[B, H, d, c]`."""
        normalised = torch.clamp(self.mlp(dequantize(tokens, self.scales, self.levels)), -1.0, 1.0)
        value = 0.5 * (normalised + 1.0) * (self.high - self.low) + self.low
        return torch.where(self.mask, value, normalised)


@dataclass
class TokenizerOutput:
    """The training-time forward pass of the tokenizer."""

    tokens: torch.Tensor  # [B, H, d, L] int64
    latent: torch.Tensor  # [B, H, d] encoder output in [-1, 1]
    reconstructions: torch.Tensor  # [L, B, H, A] normalised reconstruction with the first c = 1..L layers


class ActionTokenizer(nn.Module):
    """RFSQ tokenizer: normalise → encode → residual FSQ → decode, with the statistics it normalises by."""

    def __init__(self, config: TokenizerConfig, stats: ActionStats) -> None:
        super().__init__()
        if stats.dim != config.action_dim:
            raise ShapeError(f"ActionTokenizer: statistics have {stats.dim} dims, the config's action_dim is {config.action_dim}.")
        self.config = config
        self.stats = stats
        low, high, mask = stats.tensors()
        self.register_buffer("low", low)
        self.register_buffer("high", high)
        self.register_buffer("mask", mask)
        self.encoder = StepMLP(config.action_dim, config.mlp_hidden, config.latent_dim)
        self.decoder = StepMLP(config.latent_dim, config.mlp_hidden, config.action_dim)
        if config.learnable_scales:
            self.log_scales = nn.Parameter(torch.log(geometric_scales(config)))
        else:
            self.register_buffer("scales", geometric_scales(config))

    def same_as(self, other: ActionTokenizer) -> bool:
        """Whether `other` turns actions into the same tokens and back: equal weights, scales and normalisation bounds
        (the q01/q99 bounds and mask are buffers, so the state dict holds all of it)."""
        theirs, ours = other.state_dict(), self.state_dict()
        return theirs.keys() == ours.keys() and all(torch.equal(theirs[key], ours[key]) for key in ours)

    def current_scales(self) -> torch.Tensor:
        """The per-layer scales `[L]` in use (fixed geometric, or the learned ones)."""
        return torch.exp(self.log_scales) if self.config.learnable_scales else self.scales

    def normalize(self, actions: torch.Tensor, warn: bool = True) -> tuple[torch.Tensor, int]:
        """Checked actions `[B, H, A]` → normalised `[B, H, A]` in [-1, 1] and the number of clipped values."""
        cfg = self.config
        if actions.ndim != 3 or actions.shape[1] != cfg.chunk_len or actions.shape[2] != cfg.action_dim:
            raise ShapeError(f"ActionTokenizer: expected actions [B, {cfg.chunk_len}, {cfg.action_dim}], got {tuple(actions.shape)}.")
        if not torch.isfinite(actions).all():
            raise ShapeError("ActionTokenizer: expected finite actions, got NaN or inf.")
        return normalize(actions.float(), self.stats, warn=warn)

    def forward(self, actions: torch.Tensor) -> TokenizerOutput:
        """Training forward: tokens, latent, and straight-through reconstructions for every c = 1..L."""
        normalised, _ = self.normalize(actions, warn=False)
        latent = torch.tanh(self.encoder(normalised))
        scales = self.current_scales()
        tokens, _ = residual_quantize(latent.detach(), scales.detach(), self.config.levels)
        half = (self.config.levels - 1) / 2
        values = (tokens.to(latent.dtype) - half) / half * scales  # [B, H, d, L]
        partial = torch.cumsum(values, dim=-1).permute(3, 0, 1, 2)  # [L, B, H, d] latent from the first c layers
        straight_through = latent.unsqueeze(0) + (partial - latent.unsqueeze(0)).detach()
        if self.config.learnable_scales:
            straight_through = straight_through + (partial - partial.detach())
        return TokenizerOutput(tokens=tokens, latent=latent, reconstructions=self.decoder(straight_through))

    @torch.no_grad()
    def encode(self, actions: torch.Tensor) -> torch.Tensor:
        """Actions `[B, H, A]` in dataset units → tokens `[B, H, d, L]` (int64 in [0, V))."""
        normalised, _ = self.normalize(actions.to(self.low.device))
        latent = torch.tanh(self.encoder(normalised))
        tokens, _ = residual_quantize(latent, self.current_scales(), self.config.levels)
        return tokens

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Refuse tokens that are not integers `[B, H, d, c]` with 1 ≤ c ≤ L and values in [0, V)."""
        cfg = self.config
        if tokens.ndim != 4 or tokens.shape[1:3] != (cfg.chunk_len, cfg.latent_dim) or not 1 <= tokens.shape[3] <= cfg.num_layers:
            raise ShapeError(f"ActionTokenizer: expected tokens [B, {cfg.chunk_len}, {cfg.latent_dim}, c] with 1 <= c <= {cfg.num_layers}, "
                             f"got {tuple(tokens.shape)}.")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ShapeError(f"ActionTokenizer: expected integer tokens, got {tokens.dtype}.")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.levels):
            raise ShapeError(f"ActionTokenizer: expected tokens in [0, {cfg.levels}), got values {int(tokens.min())}..{int(tokens.max())}.")

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """Tokens `[B, H, d, c]` → actions `[B, H, A]` in dataset units, using the first `layers` (default c) layers."""
        self.check_tokens(tokens)
        if layers is not None:
            if not 1 <= layers <= tokens.shape[3]:
                raise ShapeError(f"ActionTokenizer.decode: expected layers in 1..{tokens.shape[3]}, got {layers}.")
            tokens = tokens[..., :layers]
        return self.decoder_module()(tokens.to(torch.int64).to(self.low.device))

    def decoder_module(self) -> TokenDecoder:
        """The decode graph as its own module (what export compiles; shares the decoder MLP's weights)."""
        return TokenDecoder(self)

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.safetensors` + `tokenizer.json` (config, statistics, scales, format version)."""
        meta = {"config": to_dict(self.config), "statistics": self.stats.to_json(), "scales": self.current_scales().tolist()}
        return save_artifact(directory, TOKENIZER_FILE, self.state_dict(), meta, kind="tokenizer")

    @classmethod
    def load(cls, directory: str | Path) -> ActionTokenizer:
        """Load a tokenizer written by `save` (kind, format version, hash and every key checked)."""
        tensors, meta = load_artifact(directory, TOKENIZER_FILE, kind="tokenizer")
        tokenizer = cls(from_dict(TokenizerConfig, meta["config"]), ActionStats.from_json(meta["statistics"]))
        load_strict(tokenizer, tensors, Path(directory) / f"{TOKENIZER_FILE}.safetensors")
        return tokenizer.eval()
