"""A small Qwen3-architecture text LM: transformers' `Qwen3ForCausalLM` with a byte-level BPE, saved and rebuilt from JSON.

The speculative decoder's text workload (`rsd.runtime.decoding`): a real causal LM with a KV cache whose shape is
Qwen3-0.6B's depth at a small width, so the seed's layer set `(0, 5, 11, 16, 22, 27)` applies unchanged. Training
on the Python standard library's sources is in `rsd.training.text_lm`.

The folder: `text_lm.safetensors` + `text_lm.json` (TextLMConfig, weights sha256; the tied head is stored once, as the
embedding) and `tokenizer.json` (the `tokenizers` library's own format).

Usage:
    lm = load_text_lm("runs/text_lm")
    ids = lm.encode("def main():\\n")                 # int64 [1, S]
    text = lm.decode(ids[0].tolist())
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import Qwen3Config, Qwen3ForCausalLM

from rsd.config import TextLMConfig, from_dict, to_dict
from rsd.errors import CheckpointError
from rsd.io import load_artifact, save_artifact

MODEL_FILE = "text_lm"  # text_lm.safetensors + text_lm.json
TOKENIZER_FILE = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"  # id 0 of the BPE: separates files in the training stream


def qwen3_config(config: TextLMConfig) -> Qwen3Config:
    """transformers' Qwen3Config of a TextLMConfig, with tied embeddings and SDPA attention."""
    return Qwen3Config(vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                       num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                       head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings, rope_theta=config.rope_theta,
                       rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=True, attn_implementation="sdpa")


@dataclass
class TextLM:
    """A loaded text LM: the transformers model, its tokenizer and config, and the fingerprint drafts refer to."""

    model: Qwen3ForCausalLM  # tied-embedding Qwen3 LM in eval mode
    tokenizer: Tokenizer  # the BPE it was trained with
    config: TextLMConfig  # its shape
    fingerprint: str  # sha256 of text_lm.safetensors

    def encode(self, text: str) -> torch.Tensor:
        """Token ids `[1, S]` of `text`."""
        return torch.tensor([self.tokenizer.encode(text).ids], dtype=torch.int64)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids."""
        return self.tokenizer.decode(list(ids))


def build_text_lm(config: TextLMConfig, seed: int = 0) -> Qwen3ForCausalLM:
    """A freshly initialised Qwen3 LM of `config`."""
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(qwen3_config(config))


def save_text_lm(directory: str | Path, model: Qwen3ForCausalLM, tokenizer: Tokenizer, config: TextLMConfig) -> str:
    """Write the model (the tied head is stored once, as the embedding) and tokenizer; return the weights' sha256."""
    directory = Path(directory)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_artifact(directory, MODEL_FILE, state, {"config": to_dict(config)}, kind="text_lm")
    tokenizer.save(str(directory / TOKENIZER_FILE))
    return json.loads((directory / f"{MODEL_FILE}.json").read_text())["weights_sha256"]


def load_text_lm(directory: str | Path, dtype: torch.dtype = torch.float32) -> TextLM:
    """Rebuild a saved text LM from `text_lm.json` on the meta device and assign its weights (the head is tied to the embedding)."""
    directory = Path(directory)
    tensors, meta = load_artifact(directory, MODEL_FILE, kind="text_lm")
    config = from_dict(TextLMConfig, meta["config"])
    tokenizer_file = directory / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{tokenizer_file}: expected the tokenizer beside the model, found no file; copy the whole folder.")
    with torch.device("meta"):
        model = Qwen3ForCausalLM(qwen3_config(config))
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}  # the tied head is the embedding
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k]) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(f"{directory / MODEL_FILE}.safetensors: expected the weights of {config}, got missing keys {missing}, "
                              f"unexpected keys {unexpected}, wrong shapes for {wrong}.")
    model.load_state_dict(tensors, strict=False, assign=True)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # its tables are not stored: rebuild them off the meta device
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    return TextLM(model.to(dtype).eval(), tokenizer, config, meta["weights_sha256"])
