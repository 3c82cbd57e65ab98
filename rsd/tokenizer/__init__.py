"""The RFSQ action tokenizer (docs/architecture.md, "The early-exit design").

Usage:
    from rsd.tokenizer import ActionTokenizer
    tokens = ActionTokenizer.load("runs/demo/tokenizer").encode(actions)      # [B, H, A] -> [B, H, d, L]
"""

from rsd.tokenizer.rfsq import (
    ActionTokenizer,
    TokenDecoder,
    dequantize,
    geometric_scales,
    layers_to_tokens,
    residual_quantize,
    tokens_to_layers,
)

__all__ = [
    "ActionTokenizer",
    "TokenDecoder",
    "dequantize",
    "geometric_scales",
    "layers_to_tokens",
    "residual_quantize",
    "tokens_to_layers",
]
