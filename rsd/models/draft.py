"""The draft head: the main model's exit-layer hidden state -> coarse RFSQ token logits.

docs/architecture.md, "The early-exit design", step 3. The draft reads the hidden state at the action query position after `exit_layer`
layers of the frozen main model and predicts the first C residual layers of the action tokens, so the
runtime can skip layers `exit_layer .. N-1` when the confidence of its logits (max softmax probability) passes
the calibrated threshold.

Architecture (the projection is trained and loaded, never random at load time; docs/pitfalls.md #1):
`input_norm` (LayerNorm over the main width) → `input_projection = Linear(hidden, width)` → H learned step
queries attend to the projected state through one transformer decoder layer → one Linear head per
coarse layer giving `d * V` logits per step → logits `[B, C, H*d, V]`.

Usage:
    draft = DraftHead(get_preset("tiny").draft())
    out = draft(exit_hidden)          # exit_hidden [B, hidden]
    out.logits.shape                  # [B, C, H*d, V]
    draft = DraftHead.load("runs/demo/draft", expect_hidden=128, expect_exit_layer=3)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsd.config import DraftConfig, from_dict, to_dict
from rsd.errors import CheckpointError, ShapeError
from rsd.io import check_state_dict, load_artifact, save_artifact

DRAFT_FILE = "draft"


@dataclass
class DraftOutput:
    """What the draft predicts for a batch."""

    logits: torch.Tensor  # [B, C, H*d, V] coarse-layer logits
    tokens: torch.Tensor  # [B, C, H*d] int64 argmax tokens


class DraftHead(nn.Module):
    """Exit-layer hidden `[B, hidden]` → coarse RFSQ logits `[B, C, H*d, V]`."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.config = config
        tok = config.tokenizer
        self.input_norm = nn.LayerNorm(config.hidden_size)
        self.input_projection = nn.Linear(config.hidden_size, config.width)
        self.step_queries = nn.Parameter(torch.randn(tok.chunk_len, config.width) * 0.02)
        self.decoder = nn.TransformerDecoderLayer(
            d_model=config.width,
            nhead=config.num_heads,
            dim_feedforward=config.ffn_size,
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.output_norm = nn.LayerNorm(config.width)
        self.layer_heads = nn.ModuleList(
            nn.Linear(config.width, tok.latent_dim * tok.levels) for _ in range(tok.coarse_layers)
        )

    def forward_logits(self, exit_hidden: torch.Tensor) -> torch.Tensor:
        """Coarse logits `[B, C, H*d, V]` for exit hidden states `[B, hidden]` (the exportable core)."""
        cfg, tok = self.config, self.config.tokenizer
        if exit_hidden.ndim != 2 or exit_hidden.shape[1] != cfg.hidden_size:
            raise ShapeError(f"DraftHead: expected exit hidden [B, {cfg.hidden_size}], got {tuple(exit_hidden.shape)}.")
        memory = self.input_projection(self.input_norm(exit_hidden)).unsqueeze(1)  # [B, 1, W]
        queries = self.step_queries.unsqueeze(0).expand(exit_hidden.shape[0], -1, -1) + memory  # [B, H, W]
        steps = self.output_norm(self.decoder(queries, memory))  # [B, H, W]
        per_layer = [head(steps).reshape(-1, tok.tokens_per_layer, tok.levels) for head in self.layer_heads]
        return torch.stack(per_layer, dim=1)

    def forward(self, exit_hidden: torch.Tensor) -> DraftOutput:
        """Logits and argmax tokens for exit hidden states `[B, hidden]` (the gate's confidences: `rsd.runtime.gate`)."""
        logits = self.forward_logits(exit_hidden)
        return DraftOutput(logits=logits, tokens=logits.argmax(dim=-1))

    def num_parameters(self) -> int:
        """Number of parameters (6.49 M at width 512 reading a 4096-wide model)."""
        return sum(p.numel() for p in self.parameters())

    def save(self, directory: str | Path, meta: dict[str, Any]) -> Path:
        """Write `draft.safetensors` + `draft.json` (config, `meta` such as fingerprint and metrics)."""
        return save_artifact(directory, DRAFT_FILE, self.state_dict(), {"config": to_dict(self.config), **meta}, kind="draft")

    @classmethod
    def load(
        cls,
        directory: str | Path,
        expect_hidden: int | None = None,
        expect_exit_layer: int | None = None,
        expect_fingerprint: str | None = None,
    ) -> tuple[DraftHead, dict[str, Any]]:
        """Load a trained draft, refusing missing projection weights or a mismatch with the main model."""
        tensors, meta = load_artifact(directory, DRAFT_FILE, kind="draft")
        source = Path(directory) / f"{DRAFT_FILE}.safetensors"
        config = from_dict(DraftConfig, meta["config"])
        for key, shape in (
            ("input_projection.weight", (config.width, config.hidden_size)),
            ("input_projection.bias", (config.width,)),
        ):
            if key not in tensors:
                raise CheckpointError(
                    f"{source}: expected the trained projection {key!r} of shape {list(shape)}, found no such key. "
                    "A draft without its trained input_projection cannot be used; retrain it with `rsd train-draft`."
                )
            if tuple(tensors[key].shape) != shape:
                raise CheckpointError(f"{source}: {key!r} expected shape {list(shape)}, got {list(tensors[key].shape)}.")
        checks = (
            ("hidden size", expect_hidden, config.hidden_size),
            ("exit layer", expect_exit_layer, config.exit_layer),
            ("main-model fingerprint", expect_fingerprint, meta.get("main_fingerprint")),
        )
        for what, expected, found in checks:
            if expected is not None and expected != found:
                raise CheckpointError(
                    f"{source}: the draft was trained for {what} {found!r}, but the main model has {expected!r}. "
                    "Use the draft trained for this main model and exit layer."
                )
        with torch.device("meta"):
            draft = cls(config)
        check_state_dict(draft, tensors, source)
        draft.load_state_dict(tensors, strict=True, assign=True)
        return draft.eval(), meta
