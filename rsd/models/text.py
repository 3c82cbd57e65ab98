"""Text tokenizers for the prompt: a built-in byte-level one (offline, the `tiny` preset) or a local Llama one.

Both give prompt ids without special tokens plus the BOS and pad ids; `PrismaticVLA` adds BOS itself.

Usage:
    text = load_text_tokenizer("byte")                      # or a folder holding a Llama tokenizer
    ids = text.encode("In: What action should the robot take to pick up the block?\nOut:")
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from rsd.errors import ConfigError


class TextTokenizer(Protocol):
    """What the model needs from a text tokenizer."""

    bos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens."""
        ...


class ByteTokenizer:
    """UTF-8 bytes shifted by 4 (0 pad, 1 BOS, 2 EOS, 3 unused): vocabulary 260, no files, no download."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    offset = 4
    vocab_size = 260

    def encode(self, text: str) -> list[int]:
        """Byte ids of `text` (each byte + 4)."""
        return [b + self.offset for b in text.encode("utf-8")]


class HFTokenizer:
    """A transformers tokenizer read from a local folder (OpenVLA ships Llama-2's)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise ConfigError(f"text_tokenizer: expected a local folder with a Llama tokenizer, got {str(path)!r} (no such folder).")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.bos_id = int(self.tokenizer.bos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.unk_token_id or 0)
        self.vocab_size = len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def load_text_tokenizer(spec: str) -> TextTokenizer:
    """`"byte"` gives the built-in tokenizer; a path gives the Llama tokenizer stored there; "" is an error."""
    if spec == "byte":
        return ByteTokenizer()
    if not spec:
        raise ConfigError(
            "text_tokenizer: this model has no text tokenizer configured; pass a local folder holding OpenVLA's Llama tokenizer "
            "(tokenizer.model / tokenizer.json), or use random prompt ids for latency work (`PrismaticVLA.random_inputs`)."
        )
    return HFTokenizer(spec)
