"""Engines: the draft and the action decoder behind one interface, whatever format runs them.

A draft engine maps exit hidden states `[B, hidden]` to `(logits [B, C, H*d, V], tokens [B, C, H*d],
confidence [B], confidence_min [B])`; a decoder engine maps tokens `[B, H, d, c]` to un-normalised actions
`[B, H, A]`. The formats are PyTorch eager (`torch`), TorchScript, ONNX Runtime and torch-tensorrt; the
bundle (`rsd.export.bundle`) records which files exist and `rsd.export.loaders` builds these engines from
them. Engines know nothing about observations, images or robots.

Usage:
    draft = TorchDraftEngine(draft_head)
    logits, tokens, conf, conf_min = draft(exit_hidden)
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from rsd.errors import ShapeError
from rsd.models.draft import DraftHead, token_confidence

ENGINE_PREFERENCE = ("tensorrt", "onnx", "torchscript", "torch")


class DraftEngine(Protocol):
    """Runs the draft: exit hidden `[B, hidden]` → logits, tokens, confidence, confidence_min."""

    name: str

    def __call__(self, exit_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draft outputs for a batch of exit hidden states."""
        ...


class DecoderEngine(Protocol):
    """Runs the action decoder: tokens `[B, H, d, c]` → un-normalised actions `[B, H, A]`."""

    name: str

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Actions for a batch of token tensors."""
        ...


class DraftGraph(nn.Module):
    """The exported draft graph: exit hidden `[B, hidden]` → (logits, tokens, confidence, confidence_min)."""

    def __init__(self, draft: DraftHead) -> None:
        super().__init__()
        self.draft = draft

    def forward(self, exit_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits `[B, C, H*d, V]`, tokens `[B, C, H*d]`, confidence `[B]`, confidence_min `[B]`."""
        logits = self.draft.forward_logits(exit_hidden)
        tokens, confidence, confidence_min = token_confidence(logits)
        return logits, tokens, confidence, confidence_min


class TorchDraftEngine:
    """The draft in PyTorch eager mode (always available; the reference for parity)."""

    name = "torch"

    def __init__(self, draft: DraftHead) -> None:
        self.graph = DraftGraph(draft).eval()
        self.dtype = next(draft.parameters()).dtype

    @torch.inference_mode()
    def __call__(self, exit_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draft outputs for `exit_hidden [B, hidden]` (cast to the draft's dtype)."""
        return self.graph(exit_hidden.to(self.dtype))


class TorchDecoderEngine:
    """The action decoder in PyTorch eager mode."""

    name = "torch"

    def __init__(self, decoder: nn.Module, num_layers: int) -> None:
        self.decoder = decoder.eval()
        self.num_layers = num_layers

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Actions `[B, H, A]` for tokens `[B, H, d, c]`."""
        check_decoder_tokens(tokens, self.num_layers)
        return self.decoder(tokens)


def check_decoder_tokens(tokens: torch.Tensor, num_layers: int) -> None:
    """Refuse tokens that are not int64 `[B, H, d, c]` with c == `num_layers`."""
    if tokens.ndim != 4 or tokens.shape[-1] != num_layers or tokens.dtype != torch.int64:
        raise ShapeError(
            f"decoder engine: expected int64 tokens [B, H, d, {num_layers}], got {tokens.dtype} {tuple(tokens.shape)}."
        )
