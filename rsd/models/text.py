"""Text tokenizers for the prompt: built-in ones (offline) or a local Llama one.

- `"word"` (the `tiny` preset): lower-cased words and punctuation, each hashed (crc32) into the vocabulary. No
  files, and a prompt is about 25 tokens instead of about 95 bytes, which makes the tiny model 2× cheaper to
  train. Different words can share an id (a hash collision); with a vocabulary of a few hundred and the
  few dozen words of robot instructions that is rare, and `collisions()` reports it.
- `"byte"`: UTF-8 bytes, vocabulary 260, never collides.
- a folder path: the Llama tokenizer stored there (OpenVLA).

All give prompt ids without special tokens plus the BOS and pad ids; `PrismaticVLA` adds BOS itself.

Usage:
    text = load_text_tokenizer("word", vocab_size=512)      # or "byte", or a folder holding a Llama tokenizer
    ids = text.encode("In: What action should the robot take to pick up the block?\nOut:")
"""

from __future__ import annotations

import re
import zlib
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


class WordTokenizer:
    """Words and punctuation hashed into ids 4 .. vocab_size-1 (0 pad, 1 BOS, 2 EOS, 3 unused)."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    offset = 4

    def __init__(self, vocab_size: int) -> None:
        if vocab_size <= self.offset + 16:
            raise ConfigError(f"word tokenizer: expected a vocabulary of more than {self.offset + 16} ids, got {vocab_size}.")
        self.vocab_size = vocab_size

    def words(self, text: str) -> list[str]:
        """The lower-cased words and punctuation marks of `text`."""
        return re.findall(r"\w+|[^\w\s]", text.lower())

    def encode(self, text: str) -> list[int]:
        """Hashed ids of the words of `text`."""
        return [self.offset + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - self.offset) for word in self.words(text)]

    def collisions(self, texts: list[str]) -> dict[int, list[str]]:
        """Ids shared by different words of `texts` (empty when the hashing is one-to-one on them)."""
        by_id: dict[int, set[str]] = {}
        for word in {w for t in texts for w in self.words(t)}:
            by_id.setdefault(self.encode(word)[0], set()).add(word)
        return {i: sorted(ws) for i, ws in by_id.items() if len(ws) > 1}


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


def load_text_tokenizer(spec: str, vocab_size: int) -> TextTokenizer:
    """`"word"`/`"byte"` give a built-in tokenizer; a path gives the Llama tokenizer stored there; "" is an error."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "word":
        return WordTokenizer(vocab_size)
    if not spec:
        raise ConfigError(
            "text_tokenizer: this model has no text tokenizer configured; pass a local folder holding OpenVLA's Llama tokenizer "
            "(tokenizer.model / tokenizer.json), or use random prompt ids for latency work (`PrismaticVLA.random_inputs`)."
        )
    return HFTokenizer(spec)
