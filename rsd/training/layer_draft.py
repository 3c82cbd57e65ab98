"""train-layer-draft: distil a layer-sampled draft from its frozen target (text LM or AR-mode VLA).

Only the draft's own modules learn (transitions, the knowledge cross-attention, and with `tune_layers` its copies of
the sampled layers); embeddings, final norm and head are the target's and stay frozen. The loss is the seed's:

    0.8 * KL(target || draft) + 0.3 * (1 - sum_v min(p_v, q_v))

per predicted position, where p and q are the target's and the draft's next-token distributions: the second term
is the probability that speculative sampling rejects a token drafted from q (accept with min(1, p/q)), the
total-variation distance. Text drafts train on random windows of the LM's training corpus or, with self-distillation
(`self_distill` > 0, the better choice), on sequences the target writes itself after corpus prompts, half greedy and
half sampled: a draft is judged on the target's own output, which for a small LM looks little like the corpus.
AR-VLA drafts train on the demonstration frames, teacher-forced with the demonstrated action tokens, at the 7 action
positions. A knowledge-enhanced text draft gets, with every window, a memory made of the rest of the same source
file (the target's hidden states of up to `memory_tokens` tokens around the window), as it gets at run time.
Training runs in fp32 on CUDA where it is usable, else on the CPU (`device` names one).

Usage:
    rsd train-layer-draft --target runs/text_lm --layers 0,5,11,16,22,27 --tune-layers --self-distill 1024 --out runs/text_lm/seed_tuned
    rsd train-layer-draft --target runs/ar/policy --data runs/ar/demos.hdf5 --layers 0,5 --tune-layers --out runs/ar/draft_0_5_tuned
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsd.config import to_dict
from rsd.data.chunks import split_episodes
from rsd.data.dataset import FrameDataset
from rsd.data.hdf5 import read_demos
from rsd.device import resolve_device_dtype
from rsd.errors import ConfigError, DataError
from rsd.io import writes_artifact
from rsd.models.ar_actions import POLICY_FILE, ARActionModel
from rsd.models.layer_draft import LayerDraft, LayerDraftConfig
from rsd.models.text_lm import TextLM, load_text_lm
from rsd.training.ar_policy import action_tokens
from rsd.training.schedule import adamw
from rsd.training.text_lm import read_texts, split_files, stdlib_sources

log = logging.getLogger(__name__)

TEXT_BATCH = 4  # default windows per step for a text LM target
AR_BATCH = 32  # default frames per step for an AR-mode VLA target


@dataclass(frozen=True)
class DraftTrainConfig:
    """Optimisation of a layer-sampled draft."""

    steps: int = 300  # optimiser steps
    batch_size: int = 0  # windows (text) or frames (VLA) per step (0: TEXT_BATCH windows or AR_BATCH frames)
    seq_len: int = 256  # tokens per text window
    lr: float = 3e-3  # AdamW peak learning rate (warm-up 20 steps, cosine to 10 %)
    weight_decay: float = 0.0  # AdamW weight decay
    kl_weight: float = 0.8  # weight of KL(target || draft)
    accept_weight: float = 0.3  # weight of the rejection probability (total variation)
    memory_tokens: int = 512  # knowledge drafts: memory tokens per window
    self_distill: int = 0  # text: train on this many sequences the target writes itself (0: on corpus windows)
    prompt_tokens: int = 64  # text self-distillation: corpus tokens before the target writes the rest of seq_len
    sample_fraction: float = 0.5  # text self-distillation: share of sequences sampled at temperature 1 (the rest greedy)
    write_batch: int = 64  # text self-distillation: sequences the target writes at once
    max_seconds: float = 0.0  # stop after this much training time (0: run all steps)
    val_batches: int = 8  # held-out batches for the validation metrics
    seed: int = 0  # seeds initialisation and sampling

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 0:
            raise ConfigError(f"DraftTrainConfig.batch_size: expected an int >= 0 (0: the default for the target), got {self.batch_size!r}.")
        for name in ("steps", "seq_len", "memory_tokens", "val_batches", "write_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"DraftTrainConfig.{name}: expected a positive int, got {value!r}.")
        if self.self_distill < 0 or not 0.0 <= self.sample_fraction <= 1.0:
            raise ConfigError(f"DraftTrainConfig: expected self_distill >= 0 and sample_fraction in [0, 1], got {self.self_distill}, "
                              f"{self.sample_fraction}.")
        if self.self_distill and not 0 < self.prompt_tokens < self.seq_len:
            raise ConfigError(f"DraftTrainConfig.prompt_tokens: expected an int in 1..seq_len-1 = {self.seq_len - 1} when self-distilling, "
                              f"got {self.prompt_tokens}.")
        if self.lr <= 0 or self.kl_weight < 0 or self.accept_weight < 0 or self.kl_weight + self.accept_weight == 0:
            raise ConfigError(f"DraftTrainConfig: expected lr > 0 and non-negative loss weights not both 0, got lr {self.lr}, "
                              f"kl {self.kl_weight}, accept {self.accept_weight}.")


def draft_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, kl_weight: float = 0.8, accept_weight: float = 0.3
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """`kl_weight * KL(p || q) + accept_weight * (1 - sum min(p, q))` over logits `[..., V]`, with the metrics."""
    log_q = F.log_softmax(draft_logits.float(), dim=-1)
    log_p = F.log_softmax(target_logits.float(), dim=-1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(-1).mean()
    reject = (1.0 - torch.minimum(p, log_q.exp()).sum(-1)).mean()
    agree = (draft_logits.argmax(-1) == target_logits.argmax(-1)).float().mean()
    loss = kl_weight * kl + accept_weight * reject
    return loss, {"kl": float(kl.detach()), "accept": 1.0 - float(reject.detach()), "greedy_agreement": float(agree)}


def _lr(step: int, train: DraftTrainConfig) -> float:
    warm = min(20, train.steps)
    if step < warm:
        return train.lr * (step + 1) / warm
    progress = (step - warm) / max(1, train.steps - warm)
    return train.lr * (0.1 + 0.45 * (1.0 + np.cos(np.pi * progress)))


def _optimise(draft: LayerDraft, batches: Any, validate: Any, train: DraftTrainConfig, out: Path, fingerprint: str) -> dict[str, Any]:
    """The shared loop: `batches(step)` → (draft logits, target logits); `validate()` → metrics; save at the end."""
    trainable = [p for p in draft.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("train-layer-draft: the draft has nothing to train (transition_size 0 and no knowledge); raise transition_size.")
    optimizer = adamw(trainable, lr=train.lr, weight_decay=train.weight_decay)
    history, started = [], time.perf_counter()
    before = validate()
    for step in range(train.steps):
        if train.max_seconds and time.perf_counter() - started > train.max_seconds:
            break
        draft.train()
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, train)
        draft_logits, target_logits = batches(step)
        loss, metrics = draft_loss(draft_logits, target_logits, train.kl_weight, train.accept_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        history.append({"step": step + 1, "loss": float(loss.detach()), **metrics})
        if (step + 1) % 25 == 0:
            recent = history[-25:]
            log.info("draft step %d loss %.4f accept %.3f agreement %.3f (%.0f s)", step + 1, np.mean([h["loss"] for h in recent]),
                     np.mean([h["accept"] for h in recent]), np.mean([h["greedy_agreement"] for h in recent]), time.perf_counter() - started)
    draft.eval()
    after = validate()
    draft.save(out, fingerprint)
    summary = {"config": to_dict(draft.config), "train": to_dict(train), "steps": len(history), "val_before": before, "val": after,
               "parameters": sum(p.numel() for p in trainable), "seconds": time.perf_counter() - started, "history": history[::10]}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _freeze(module: nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


def sample_file_windows(streams: Sequence[np.ndarray], count: int, length: int, memory: int, rng: np.random.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`count` windows `[count, length]` from random files, and (memory > 0) `memory` tokens of the rest of each file."""
    windows, memories = [], []
    for index in rng.integers(0, len(streams), size=count):
        stream = streams[index]
        start = int(rng.integers(0, stream.shape[0] - length + 1))
        windows.append(stream[start : start + length])
        if memory:
            memories.append(knowledge_tokens(stream, start, length, memory))
    return torch.from_numpy(np.stack(windows)), (torch.from_numpy(np.stack(memories)) if memory else None)


@torch.no_grad()
def write_continuations(target: nn.Module, prompts: torch.Tensor, new_tokens: int, temperature: float, generator: torch.Generator,
                        batch_size: int = 64) -> torch.Tensor:
    """Prompts `[N, P]` followed by `new_tokens` the target writes itself `[N, P + T]` (on the CPU): greedy (temperature 0) or
    sampled with the CPU `generator`."""
    from transformers import DynamicCache

    device = next(target.parameters()).device
    rows = []
    for chunk in prompts.to(device).split(batch_size):
        cache = DynamicCache(config=target.config)
        logits = target(input_ids=chunk, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        written = []
        for _ in range(new_tokens):
            if temperature == 0:
                token = logits.argmax(-1, keepdim=True)
            else:
                token = torch.multinomial(torch.softmax(logits.double() / temperature, -1).cpu(), 1, generator=generator).to(device)
            written.append(token)
            logits = target(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
        rows.append(torch.cat([chunk, *written], dim=1).cpu())
    return torch.cat(rows)


@dataclass
class _WrittenWindows:
    """Sequences the target wrote after corpus prompts (self-distillation data), with their knowledge memories."""

    tokens: torch.Tensor  # [N, L]
    memory: torch.Tensor | None  # [N, M] or None

    @classmethod
    def write(cls, target: nn.Module, streams: Sequence[np.ndarray], count: int, train: DraftTrainConfig, memory: int,
              rng: np.random.Generator) -> _WrittenWindows:
        """Write `count` sequences: prompts of `train.prompt_tokens` from `streams`, continued to `train.seq_len` tokens."""
        prompts, memories = sample_file_windows(streams, count, train.seq_len, memory, rng)
        prompts = prompts[:, : train.prompt_tokens]
        sampled = int(round(count * train.sample_fraction))
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**31)))
        new = train.seq_len - train.prompt_tokens
        tokens = torch.cat([write_continuations(target, prompts[: count - sampled], new, 0.0, generator, train.write_batch),
                            write_continuations(target, prompts[count - sampled :], new, 1.0, generator, train.write_batch)])
        return cls(tokens, memories)

    def batch(self, count: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`count` random sequences and their memories."""
        rows = torch.from_numpy(rng.choice(self.tokens.shape[0], size=count, replace=False))
        return self.tokens[rows], (None if self.memory is None else self.memory[rows])


def knowledge_tokens(stream: np.ndarray, start: int, length: int, memory: int) -> np.ndarray:
    """`memory` tokens of a file outside the window `[start, start + length)`: half before it, the rest after (or more of either side)."""
    before, after = stream[:start], stream[start + length :]
    if before.shape[0] + after.shape[0] < memory:
        raise DataError(f"knowledge_tokens: expected at least {memory} tokens outside the window, got {before.shape[0] + after.shape[0]}.")
    take_before = min(before.shape[0], max(memory // 2, memory - after.shape[0]))
    return np.concatenate([before[before.shape[0] - take_before :], after[: memory - take_before]])


def memory_states(target: nn.Module, memory_ids: torch.Tensor) -> torch.Tensor:
    """The target's final hidden states `[B, M, D]` of memory token ids `[B, M]` (the knowledge memory, no gradient)."""
    with torch.no_grad():
        return target.get_decoder()(input_ids=memory_ids.to(next(target.parameters()).device)).last_hidden_state


@writes_artifact("layer_draft")
def train_layer_draft_text(lm_dir: str | Path, out: str | Path, layers: Sequence[int], train: DraftTrainConfig | None = None,
                           transition_size: int = 64, knowledge: bool = False, files: Sequence[Path] | None = None,
                           root: str | Path | None = None, tune_layers: bool = False, device: str | torch.device | None = None
                           ) -> dict[str, Any]:
    """Train a layer-sampled draft of the text LM in `lm_dir` on its corpus or on what it writes itself; save it to `out`.

    With `train.self_distill` > 0 the training windows are that many sequences the target writes after corpus prompts
    (a `sample_fraction` share sampled at temperature 1, the rest greedy), which is what the draft meets at run time;
    validation then uses sequences written after held-out prompts. Otherwise windows are random corpus windows.
    """
    train = train or DraftTrainConfig()
    train = dataclasses.replace(train, batch_size=train.batch_size or TEXT_BATCH)
    torch.manual_seed(train.seed)
    device, _ = resolve_device_dtype(device, torch.float32)
    lm = load_text_lm(lm_dir)
    target = lm.model.to(device)
    _freeze(target)
    train_files, held_files = split_files(list(files) if files is not None else stdlib_sources(root), root)
    draft = LayerDraft(LayerDraftConfig.for_target(target, layers, transition_size=transition_size, knowledge=knowledge,
                                                   tune_layers=tune_layers), target)
    memory = train.memory_tokens if knowledge else 0
    need = train.seq_len + memory
    streams = [s for s in _file_streams(lm, train_files) if s.shape[0] >= need]
    held = [s for s in _file_streams(lm, held_files) if s.shape[0] >= need]
    if not streams or not held:
        raise DataError(f"train-layer-draft: expected files of at least {need} tokens in both splits, found {len(streams)} and {len(held)}.")
    rng, val_rng = np.random.default_rng(train.seed), np.random.default_rng(train.seed + 1)
    val_count = train.val_batches * train.batch_size
    if train.self_distill:
        written = _WrittenWindows.write(target, streams, train.self_distill, train, memory, rng)
        val_written = _WrittenWindows.write(target, held, val_count, train, memory, val_rng)
        val = list(zip(val_written.tokens.split(train.batch_size),
                       val_written.memory.split(train.batch_size) if memory else [None] * train.val_batches, strict=True))
    else:
        val = [sample_file_windows(held, train.batch_size, train.seq_len, memory, val_rng) for _ in range(train.val_batches)]

    def logits_pair(windows: torch.Tensor, memory_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        windows = windows.to(device)
        with torch.no_grad():
            target_logits = target(input_ids=windows).logits
        kv = draft.cross_attention.keys_values(memory_states(target, memory_ids)) if memory_ids is not None else None
        positions = torch.arange(windows.shape[1], device=device).expand(windows.shape[0], -1)
        hidden = draft.hidden(target.get_input_embeddings()(windows), positions, knowledge=kv)
        return draft.logits(hidden), target_logits

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if train.self_distill:
            return logits_pair(*written.batch(train.batch_size, rng))
        return logits_pair(*sample_file_windows(streams, train.batch_size, train.seq_len, memory, rng))

    def validate() -> dict[str, float]:
        draft.eval()
        with torch.no_grad():
            results = [draft_loss(*logits_pair(w, m), train.kl_weight, train.accept_weight)[1] for w, m in val]
        return {k: float(np.mean([r[k] for r in results])) for k in results[0]}

    return _optimise(draft, batches, validate, train, Path(out), lm.fingerprint)


def _file_streams(lm: TextLM, files: Sequence[Path]) -> list[np.ndarray]:
    """Token ids per file."""
    return [np.asarray(e.ids, dtype=np.int64) for e in lm.tokenizer.encode_batch(read_texts(files))]


@writes_artifact("layer_draft")
def train_layer_draft_ar(policy_dir: str | Path, data: str | Path, out: str | Path, layers: Sequence[int],
                         train: DraftTrainConfig | None = None, transition_size: int = 64, val_fraction: float = 0.1,
                         tune_layers: bool = False, device: str | torch.device | None = None) -> dict[str, Any]:
    """Train a layer-sampled draft of the AR-mode VLA in `policy_dir` on demonstration frames; save it to `out`."""
    train = train or DraftTrainConfig(steps=400)
    train = dataclasses.replace(train, batch_size=train.batch_size or AR_BATCH)
    torch.manual_seed(train.seed)
    device, _ = resolve_device_dtype(device, torch.float32)
    model = ARActionModel.load(policy_dir, device=device)
    _freeze(model.vla)
    config = model.tokenizer.config
    target = model.vla.language_model
    draft = LayerDraft(LayerDraftConfig.for_target(target, layers, transition_size=transition_size, token_offset=config.token_offset,
                                                   vocab_size=config.num_bins, tune_layers=tune_layers), target)
    episodes = read_demos(data)
    dataset = FrameDataset(episodes, chunk_len=1)
    train_eps, val_eps = split_episodes([e.episode_id for e in episodes], val_fraction, train.seed)
    tokens = action_tokens(model, dataset.all_actions()[:, 0])
    train_rows = np.flatnonzero(np.isin(dataset.episode_ids, train_eps))
    val_rows = np.flatnonzero(np.isin(dataset.episode_ids, val_eps))[: train.val_batches * train.batch_size]
    rng = np.random.default_rng(train.seed)
    weight = target.lm_head.weight[config.token_offset : config.token_offset + config.num_bins]

    def logits_pair(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        batch = dataset.batch(rows)
        inputs = model.vla.encode_inputs(batch.images, batch.instructions)
        with torch.no_grad():
            state = model.teacher_forced_state(inputs, tokens[rows])
            target_logits = F.linear(model.vla.final_readout(state), weight)
        hidden = draft.hidden(state.hidden, state.position_ids, state.attention_mask)
        index = state.readout.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return draft.logits(hidden.gather(1, index)), target_logits

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_pair(rng.choice(train_rows, size=train.batch_size, replace=False))

    def validate() -> dict[str, float]:
        draft.eval()
        with torch.no_grad():
            results = [draft_loss(*logits_pair(val_rows[i : i + train.batch_size]), train.kl_weight, train.accept_weight)[1]
                       for i in range(0, len(val_rows), train.batch_size)]
        return {k: float(np.mean([r[k] for r in results])) for k in results[0]}

    return _optimise(draft, batches, validate, train, Path(out), model.fingerprint)


def train_layer_draft(target: str | Path, out: str | Path, layers: Sequence[int], train: DraftTrainConfig | None = None,
                      transition_size: int = 64, knowledge: bool = False, tune_layers: bool = False, data: str | Path | None = None,
                      device: str | torch.device | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train a draft of the folder `target`: an AR policy (on its demonstrations `data`) or a text LM (on its corpus).

    `out` is written through a staging folder (`rsd.io.writes_artifact`); an existing draft there needs `overwrite=True`.
    """
    if (Path(target) / POLICY_FILE).is_file():
        if data is None or knowledge or (train is not None and train.self_distill):
            raise ConfigError(f"train-layer-draft: an AR policy target ({target}) needs its demonstrations (data) and takes no knowledge "
                              "cross-attention or self-distillation; pass --data and drop --knowledge/--self-distill.")
        return train_layer_draft_ar(target, data, out, layers, train, transition_size, tune_layers=tune_layers, device=device,
                                    overwrite=overwrite)
    if data is not None:
        raise ConfigError(f"train-layer-draft: a text LM target ({target}) trains on its own corpus, got demonstrations {data}; drop --data.")
    return train_layer_draft_text(target, out, layers, train, transition_size, knowledge, tune_layers=tune_layers, device=device,
                                  overwrite=overwrite)
