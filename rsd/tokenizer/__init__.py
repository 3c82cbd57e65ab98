"""The RFSQ action tokenizer (DESIGN.md §2)."""

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
