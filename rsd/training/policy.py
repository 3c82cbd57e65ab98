"""train-policy: behaviour cloning of PrismaticVLA + RFSQ head on the RFSQ tokens of demonstration chunks.

Each frame's target is the tokenizer's tokens of the H-step action chunk starting at that frame (all L
residual layers); the loss is the cross-entropy over tokens, weighted per layer. The tokenizer is frozen and
its action statistics are the policy's, so un-normalisation at run time is exactly the inverse of what
training saw; proprio statistics come from the training episodes. The validation split is by episode and
reports per-layer token accuracy and the decoded-action error against the demonstrated chunk. The per-layer
cross-entropies are weighted by `policy_layer_weights` (coarse layers count more).
`freeze_backbone=True` trains only the head (for big frozen backbones).

Usage:
    rsd train-policy --data runs/demo/demos.hdf5 --tokenizer runs/demo/tokenizer --preset tiny --out runs/demo/policy
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rsd.config import TrainConfig, get_preset, to_dict
from rsd.data.chunks import split_episodes
from rsd.data.dataset import FrameDataset, compute_statistics
from rsd.data.source import DataSource, as_source, read_episodes, source_statistics
from rsd.data.stats import DatasetStatistics
from rsd.errors import ConfigError, DataError
from rsd.models.heads import RFSQHead
from rsd.models.policy import MainModel
from rsd.models.vla import PrismaticVLA
from rsd.tokenizer import ActionTokenizer, tokens_to_layers


def train_policy(
    data: str | Path | DataSource,
    tokenizer: str | Path,
    out: str | Path,
    preset: str = "tiny",
    train: TrainConfig | None = None,
    freeze_backbone: bool = False,
    dataset_key: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the main policy on the demonstrations in `data` and save the best epoch to `out`."""
    spec = get_preset(preset)
    train = train or spec.policy_train
    torch.manual_seed(train.seed)
    action_tokenizer = ActionTokenizer.load(tokenizer)
    if action_tokenizer.config != spec.model.tokenizer:
        raise ConfigError(f"train-policy: the tokenizer's shape {action_tokenizer.config} differs from preset {preset!r}'s {spec.model.tokenizer}.")
    source = as_source(data)
    episodes = read_episodes(source)
    if len(episodes) < 2:
        raise DataError(f"{data}: expected at least 2 episodes to split into training and validation, got {len(episodes)}.")
    dataset = FrameDataset(episodes, action_tokenizer.config.chunk_len)
    _check_inputs(source, dataset, spec.model.num_images, spec.model.proprio_dim, preset)
    train_eps, val_eps = split_episodes([e.episode_id for e in episodes], train.val_fraction, train.seed)
    train_stats = compute_statistics([e for e in episodes if e.episode_id in set(train_eps)])
    own = source_statistics(source)
    statistics = DatasetStatistics(
        action=action_tokenizer.stats,
        proprio=own.proprio if own is not None and own.proprio is not None else train_stats.proprio,
        num_transitions=train_stats.num_transitions,
        num_trajectories=train_stats.num_trajectories,
    )
    vla = PrismaticVLA(spec.model)
    head = RFSQHead(spec.model.llm.hidden_size, spec.model.tokenizer)
    main = MainModel(vla, head, action_tokenizer, statistics, dataset_key or Path(source.path).stem)
    main.tokenizer.requires_grad_(False)
    if freeze_backbone:
        vla.requires_grad_(False)
    trainable = [p for p in main.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
    train_rows = np.flatnonzero(np.isin(dataset.episode_ids, train_eps))
    val_rows = np.flatnonzero(np.isin(dataset.episode_ids, val_eps))
    with torch.no_grad():
        targets = tokens_to_layers(action_tokenizer.encode(torch.as_tensor(dataset.all_actions(), dtype=torch.float32)))
    layer_weights = policy_layer_weights(action_tokenizer)
    steps = train.epochs * math.ceil(len(train_rows) / train.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train.lr, total_steps=steps, pct_start=0.05, anneal_strategy="cos")
    rng = np.random.default_rng(train.seed)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    started = time.perf_counter()
    for epoch in range(train.epochs):
        main.train()
        main.tokenizer.eval()
        order = rng.permutation(train_rows)
        losses = []
        bar = tqdm(range(0, len(order), train.batch_size), desc=f"train-policy epoch {epoch + 1}/{train.epochs}", unit="batch", disable=not progress)
        for start in bar:
            rows = order[start : start + train.batch_size]
            batch = dataset.batch(rows)
            logits = main.head(main.vla(main.prepare(batch.images, batch.instructions, batch.proprio)))
            loss = token_loss(logits, targets[rows], layer_weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach().item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        metrics = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), **validate_policy(main, dataset, val_rows, targets), "seconds": time.perf_counter() - started}
        history.append(metrics)
        if best is None or metrics["val_action_l1"] < best["val_action_l1"]:
            best = metrics
            main.eval()
            main.save(out)
    summary = {
        "best": best,
        "history": history,
        "train_episodes": [int(e) for e in train_eps],
        "val_episodes": [int(e) for e in val_eps],
        "train": to_dict(train),
        "preset": preset,
        "freeze_backbone": freeze_backbone,
        "seconds": time.perf_counter() - started,
        "fingerprint": main.fingerprint,
    }
    (Path(out) / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_inputs(source: DataSource, dataset: FrameDataset, num_images: int, proprio_dim: int, preset: str) -> None:
    """The data's cameras and proprio against what the preset's model takes, before any training."""
    if len(dataset.cameras) != num_images:
        raise DataError(f"{source.path}: preset {preset!r} takes {num_images} camera(s), the data has {len(dataset.cameras)} "
                        f"({dataset.cameras}); choose them with --camera (DataSource.cameras).")
    proprio = dataset.episodes[0].proprio
    width = 0 if proprio is None else proprio.shape[1]
    if width != proprio_dim:
        raise DataError(f"{source.path}: preset {preset!r} takes proprio of {proprio_dim} dims, the data gives {width}; "
                        "choose keys with --state-key or --no-state (DataSource.proprio_keys).")


def policy_layer_weights(tokenizer: ActionTokenizer) -> torch.Tensor:
    """Per-layer loss weights `[L]` ∝ sqrt(s_l / s_0), normalised to sum to 1.

    Layer l moves the latent by at most s_l, so its tokens matter less for the decoded chunk the finer it is;
    the square root keeps the coarse layers the draft predicts (l < C) well weighted while the near-noise finest
    layers no longer dominate the gradient.
    """
    scales = tokenizer.current_scales().detach().float()
    weights = torch.sqrt(scales / scales[0])
    return weights / weights.sum()


def token_loss(logits: torch.Tensor, targets: torch.Tensor, layer_weights: torch.Tensor) -> torch.Tensor:
    """Layer-weighted cross-entropy of logits `[B, L, T, V]` against tokens `[B, L, T]`."""
    per_token = F.cross_entropy(logits.permute(0, 3, 1, 2), targets, reduction="none")  # [B, L, T]
    return (per_token.mean(dim=(0, 2)) * layer_weights.to(per_token.device)).sum()


@torch.inference_mode()
def validate_policy(main: MainModel, dataset: FrameDataset, rows: np.ndarray, targets: torch.Tensor, batch_size: int = 128) -> dict[str, Any]:
    """Per-layer token accuracy and decoded-action L1 (normalised units) of `main` on frames `rows`."""
    main.eval()
    correct = torch.zeros(main.tokenizer.config.num_layers)
    action_error, count = 0.0, 0
    scale = main.tokenizer.stats.normalized_scale()
    for start in range(0, len(rows), batch_size):
        index = rows[start : start + batch_size]
        batch = dataset.batch(index)
        logits = main.head(main.vla(main.prepare(batch.images, batch.instructions, batch.proprio)))
        correct += (logits.argmax(-1) == targets[index]).float().mean(dim=2).sum(dim=0)
        predicted = main.decode_logits(logits)
        truth = torch.as_tensor(batch.actions, dtype=torch.float32)
        action_error += float(((predicted - truth).abs() * scale).mean(dim=(1, 2)).sum())
        count += len(index)
    return {"val_layer_accuracy": [float(c) / count for c in correct], "val_action_l1": action_error / count}
