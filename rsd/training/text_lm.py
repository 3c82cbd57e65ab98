"""train-text-lm: a tiny Qwen3-architecture LM trained on the Python standard library's own sources, a real text
workload for speculative decoding on the CPU with nothing to download.

The corpus is every `.py` file of this interpreter's standard library outside test folders; about 5 % of the files
(by a hash of their path, so the split never changes) are held out for validation and evaluation prompts. The
tokenizer is a byte-level BPE trained here with the `tokenizers` library: multi-character tokens like Qwen3's own
BPE (acceptance then counts identifiers and keywords, not single bytes), and a small vocabulary keeps the tied
LM head cheap. The model (`rsd.models.text_lm`) is transformers' `Qwen3ForCausalLM` at Qwen3-0.6B's depth of 28
layers and a small width (the `qwen3-tiny` text LM preset). Besides the model folder, `metrics.json` is written.

Usage:
    rsd train-text-lm --out runs/text_lm --max-seconds 900
    metrics = train_text_lm("runs/text_lm", "qwen3-tiny", TextTrainConfig(max_seconds=900))
"""

from __future__ import annotations

import json
import logging
import math
import sysconfig
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen3ForCausalLM

from rsd.config import TextLMConfig, to_dict
from rsd.device import resolve_device_dtype
from rsd.errors import ConfigError, DataError
from rsd.io import writes_artifact
from rsd.models.text_lm import END_OF_TEXT, build_text_lm, load_text_lm, save_text_lm
from rsd.presets import get_text_lm_preset
from rsd.training.schedule import adamw

log = logging.getLogger(__name__)

SKIPPED_FOLDERS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "turtledemo", "__pycache__"}
HELD_OUT_PERCENT = 5  # files whose path hash falls below this percentage are held out


@dataclass(frozen=True)
class TextTrainConfig:
    """Optimisation of the text LM: random windows of the training corpus, AdamW, warm-up then cosine decay."""

    steps: int = 3000  # optimiser steps (training may stop earlier at max_seconds)
    batch_size: int = 4  # windows per step
    seq_len: int = 256  # tokens per window
    lr: float = 2e-3  # peak learning rate
    warmup: int = 50  # linear warm-up steps
    weight_decay: float = 0.01  # AdamW weight decay
    max_seconds: float = 0.0  # stop after this much training time (0: run all steps); the cosine follows `steps`
    val_windows: int = 32  # held-out windows for the validation loss
    seed: int = 0  # seeds initialisation and window sampling

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "val_windows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"TextTrainConfig.{name}: expected a positive int, got {value!r}.")
        if self.lr <= 0 or self.max_seconds < 0 or self.warmup < 0:
            raise ConfigError(f"TextTrainConfig: expected lr > 0, warmup >= 0, max_seconds >= 0, got {self.lr}, {self.warmup}, {self.max_seconds}.")


def stdlib_sources(root: str | Path | None = None) -> list[Path]:
    """The standard library's `.py` files outside test and vendored folders, sorted (root: this interpreter's stdlib)."""
    folder = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in folder.rglob("*.py") if not SKIPPED_FOLDERS & set(p.relative_to(folder).parts[:-1]))
    if not files:
        raise DataError(f"{folder}: expected Python sources, found no .py files.")
    return files


def split_files(files: Sequence[Path], root: str | Path | None = None) -> tuple[list[Path], list[Path]]:
    """(train, held-out) files: a file is held out when crc32 of its path relative to `root` falls in the lowest 5 %."""
    folder = Path(root or sysconfig.get_paths()["stdlib"])
    held = [f for f in files if zlib.crc32(str(f.relative_to(folder)).encode()) % 100 < HELD_OUT_PERCENT]
    train = [f for f in files if f not in set(held)]
    if not held or not train:
        raise DataError(f"split_files: expected files in both splits, got {len(train)} training and {len(held)} held-out.")
    return train, held


def read_texts(files: Sequence[Path]) -> list[str]:
    """File contents as text (undecodable bytes replaced)."""
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer of `vocab_size` ids (id 0 is `<|endoftext|>`), trained on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode_corpus(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """All texts as one int64 token stream `[N]`, each text followed by `<|endoftext|>`."""
    end = tokenizer.token_to_id(END_OF_TEXT)
    parts = [np.asarray([*encoding.ids, end], dtype=np.int64) for encoding in tokenizer.encode_batch(list(texts))]
    return np.concatenate(parts)


def lr_at(step: int, train: TextTrainConfig) -> float:
    """Learning rate at `step`: linear warm-up, then cosine decay to 10 % of the peak at `train.steps`."""
    if step < train.warmup:
        return train.lr * (step + 1) / train.warmup
    progress = min(1.0, (step - train.warmup) / max(1, train.steps - train.warmup))
    return train.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def sample_windows(stream: np.ndarray, count: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    """`count` random windows `[count, length]` of a token stream."""
    if stream.shape[0] <= length:
        raise DataError(f"sample_windows: expected a token stream longer than {length}, got {stream.shape[0]} tokens.")
    starts = rng.integers(0, stream.shape[0] - length, size=count)
    return torch.from_numpy(np.stack([stream[s : s + length] for s in starts]))


@torch.no_grad()
def validation_loss(model: Qwen3ForCausalLM, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over held-out windows `[N, S]`."""
    model.eval()
    device = next(model.parameters()).device
    losses = [F.cross_entropy(model(input_ids=w.to(device)).logits[:, :-1].flatten(0, 1), w[:, 1:].to(device).flatten()).item()
              for w in windows.split(batch_size)]
    return float(np.mean(losses))


@writes_artifact("text_lm")
def train_text_lm(out: str | Path, config: TextLMConfig | str = "qwen3-tiny", train: TextTrainConfig | None = None,
                  files: Sequence[Path] | None = None, root: str | Path | None = None, progress: bool = True,
                  resume: str | Path | None = None, device: str | torch.device | None = None) -> dict[str, Any]:
    """Train the BPE and the LM on the stdlib sources (or `files` under `root`); save to `out`; return the metrics.

    With `resume`, training continues from the LM saved there (its tokenizer and config; `config` is ignored) under a
    fresh warm-up and cosine schedule. `device` defaults to CUDA where it is usable (fp32 either way). `out` is written
    through a staging folder (`rsd.io.writes_artifact`); an existing text LM there needs `overwrite=True`.
    """
    device, _ = resolve_device_dtype(device, torch.float32)
    previous = load_text_lm(resume) if resume is not None else None
    if previous is not None:
        config = previous.config
    elif isinstance(config, str):
        config = get_text_lm_preset(config)
    train = train or TextTrainConfig()
    started = time.perf_counter()
    all_files = list(files) if files is not None else stdlib_sources(root)
    train_files, held_files = split_files(all_files, root)
    train_texts = read_texts(train_files)
    tokenizer = previous.tokenizer if previous is not None else train_bpe(train_texts, config.vocab_size)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise DataError(f"train_bpe: expected {config.vocab_size} tokens, the corpus gave {tokenizer.get_vocab_size()}; use a smaller vocab_size.")
    stream = encode_corpus(tokenizer, train_texts)
    held = encode_corpus(tokenizer, read_texts(held_files))
    rng = np.random.default_rng(train.seed)
    val_windows = sample_windows(held, train.val_windows, train.seq_len + 1, np.random.default_rng(train.seed + 1))
    model = (previous.model if previous is not None else build_text_lm(config, train.seed)).to(device)
    optimizer = adamw(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.95))
    history: list[dict[str, float]] = []
    log.info("text LM: %.2f M parameters, %d training tokens (%d files), %d held-out tokens (%d files)",
             sum(p.numel() for p in model.parameters()) / 1e6, stream.shape[0], len(train_files), held.shape[0], len(held_files))
    train_started = time.perf_counter()
    step = 0
    for step in range(train.steps):
        if train.max_seconds and time.perf_counter() - train_started > train.max_seconds:
            break
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, train)
        batch = sample_windows(stream, train.batch_size, train.seq_len + 1, rng).to(device)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append({"step": step + 1, "loss": float(loss.detach())})
        if progress and (step + 1) % 25 == 0:
            log.info("step %d loss %.3f (%.0f s)", step + 1, np.mean([h["loss"] for h in history[-25:]]), time.perf_counter() - train_started)
    steps_done = len(history)
    model.eval()
    fingerprint = save_text_lm(out, model, tokenizer, config)
    metrics = {
        "config": to_dict(config),
        "train": to_dict(train),
        "resumed_from": None if previous is None else {"path": str(resume), "fingerprint": previous.fingerprint},
        "steps": steps_done,
        "tokens_seen": steps_done * train.batch_size * train.seq_len,
        "final_train_loss": float(np.mean([h["loss"] for h in history[-25:]])) if history else math.nan,
        "val_loss": validation_loss(model, val_windows),
        "train_files": len(train_files),
        "held_out_files": [str(f) for f in held_files],
        "train_tokens": int(stream.shape[0]),
        "seconds": time.perf_counter() - started,
        "fingerprint": fingerprint,
        "history": history[::10],
    }
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
