"""The main model's RFSQ head: final hidden state at the action query → logits for all L residual layers.

All L layers are predicted in parallel from the hidden state alone (no layer is conditioned on ground-truth
tokens of another; docs/pitfalls.md #4). Per step of the chunk a projection gives a `width` feature, and one
shared output layer maps it to `L * d * V` logits.

`ObjectStateHead` is training-time only: it regresses the recorded object state from the same hidden state
(`PolicyTrainConfig.object_loss`) and is never saved with the policy.

Usage:
    head = RFSQHead(hidden_size=4096, tokenizer=TokenizerConfig())
    logits = head(hidden)                      # hidden [B, D] -> [B, L, H*d, V]
    objects = ObjectStateHead(hidden_size=64, state_dim=8)(hidden)   # [B, D] -> [B, S]
"""

from __future__ import annotations

import torch
from torch import nn

from rsd.config import TokenizerConfig
from rsd.errors import ShapeError


class RFSQHead(nn.Module):
    """Query hidden `[B, D]` → RFSQ logits `[B, L, H*d, V]`."""

    def __init__(self, hidden_size: int, tokenizer: TokenizerConfig, width: int = 256) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.tokenizer = tokenizer
        self.width = width
        self.step_projection = nn.Linear(hidden_size, tokenizer.chunk_len * width)
        self.step_norm = nn.LayerNorm(width)
        self.activation = nn.GELU()
        self.output = nn.Linear(width, tokenizer.num_layers * tokenizer.latent_dim * tokenizer.levels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[B, L, H*d, V]` for final query hidden states `[B, D]`."""
        tok = self.tokenizer
        if hidden.ndim != 2 or hidden.shape[1] != self.hidden_size:
            raise ShapeError(f"RFSQHead: expected hidden [B, {self.hidden_size}], got {tuple(hidden.shape)}.")
        steps = self.activation(self.step_norm(self.step_projection(hidden).reshape(-1, tok.chunk_len, self.width)))
        logits = self.output(steps).reshape(-1, tok.chunk_len, tok.num_layers, tok.latent_dim, tok.levels)
        return logits.permute(0, 2, 1, 3, 4).reshape(-1, tok.num_layers, tok.tokens_per_layer, tok.levels)


class ObjectStateHead(nn.Module):
    """Query hidden `[B, D]` → predicted object state `[B, S]` (standardised units): an auxiliary target in training."""

    def __init__(self, hidden_size: int, state_dim: int, width: int = 128) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.layers = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, state_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Object state `[B, S]` for query hidden states `[B, D]`."""
        if hidden.ndim != 2 or hidden.shape[1] != self.hidden_size:
            raise ShapeError(f"ObjectStateHead: expected hidden [B, {self.hidden_size}], got {tuple(hidden.shape)}.")
        return self.layers(hidden)
