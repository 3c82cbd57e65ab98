"""train-tokenizer: fit the RFSQ action tokenizer on the action chunks of training episodes.

Statistics (q01/q99) come from the training episodes only, unless the dataset carries its own over all its
episodes (a LeRobot folder's `meta/stats.json`, `rsd.data.source.source_statistics`); chunks are H consecutive steps inside one
episode with the tail padded by the last action; the train/validation split is by episode (docs/pitfalls.md
#5). The loss is the MSE on normalised actions of the full reconstruction plus a quarter of the mean
MSE of the partial ones (c = 1..L-1), so the coarse layers the draft predicts decode to a usable chunk.
The report gives the validation MSE for every c, the per-dimension max error and the token usage per layer.
Under torchrun the tokenizer is trained with DDP on slices of the same seeded global batches
(`rsd.distributed.World.batch_share`); rank 0 alone writes.

Usage:
    rsd train-tokenizer --data runs/demo/demos.hdf5 --out runs/demo/tokenizer
    torchrun --nproc-per-node 2 -m rsd.cli train-tokenizer --data runs/demo/demos.hdf5 --out runs/demo/tokenizer
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rsd import distributed
from rsd.config import TokenizerConfig, TrainConfig, to_dict
from rsd.data.chunks import chunk_actions, split_episodes
from rsd.data.source import DataSource, as_source, read_action_episodes, source_statistics
from rsd.data.stats import ActionStats
from rsd.errors import DataError
from rsd.io import writes_artifact
from rsd.presets import get_preset
from rsd.tokenizer import ActionTokenizer
from rsd.training.schedule import adamw, one_cycle

log = logging.getLogger(__name__)

PARTIAL_WEIGHT = 0.25  # weight of the mean partial-reconstruction MSE in the loss
OUTLIER_RANGES = 10.0  # an action further than this many q01..q99 ranges outside them is refused as corrupt, not clipped


@writes_artifact("tokenizer")
def train_tokenizer(
    episodes: Sequence[np.ndarray],
    config: TokenizerConfig,
    train: TrainConfig,
    out: str | Path,
    episode_ids: Sequence[int] | None = None,
    progress: bool = True,
    stats: ActionStats | None = None,
) -> dict[str, Any]:
    """Train a tokenizer on per-episode actions `[T_i, A]`, save it to `out` with `report.json`/`report.md`.

    `stats`: normalisation statistics to use (a dataset's own); None computes q01/q99 from the training episodes.
    `out` is written through a staging folder (`rsd.io.writes_artifact`); an existing tokenizer there needs `overwrite=True`.
    """
    ids = list(range(len(episodes))) if episode_ids is None else [int(i) for i in episode_ids]
    if len(ids) != len(episodes):
        raise DataError(f"train-tokenizer: expected one episode id per episode ({len(episodes)}), got {len(ids)}.")
    for episode_id, actions in zip(ids, episodes, strict=False):
        if actions.ndim != 2 or actions.shape[1] != config.action_dim:
            raise DataError(f"train-tokenizer: episode {episode_id} expected actions [T, {config.action_dim}], got {actions.shape}.")
    torch.manual_seed(train.seed)
    train_ids, val_ids = split_episodes(ids, train.val_fraction, train.seed)
    by_id = dict(zip(ids, episodes, strict=False))
    if stats is not None and stats.dim != config.action_dim:
        raise DataError(f"train-tokenizer: expected the dataset's statistics to have {config.action_dim} dimensions, got {stats.dim}.")
    statistics_source = "dataset" if stats is not None else "training episodes"
    stats = stats or ActionStats.from_actions(np.concatenate([by_id[i] for i in train_ids]))
    check_outliers(by_id, stats)
    train_chunks = torch.as_tensor(np.concatenate([chunk_actions(by_id[i], config.chunk_len) for i in train_ids]), dtype=torch.float32)
    val_chunks = torch.as_tensor(np.concatenate([chunk_actions(by_id[i], config.chunk_len) for i in val_ids]), dtype=torch.float32)
    tokenizer = ActionTokenizer(config, stats)
    _, clipped_train = tokenizer.normalize(train_chunks, warn=False)
    if clipped_train:
        log.warning("train-tokenizer: %d training action values lie outside the q01..q99 range and are clipped to it "
                    "(counted in report.json, clipped_values).", clipped_train)
    world = distributed.current()
    model = distributed.Parallel(tokenizer, tokenizer_loss)
    optimizer = adamw(tokenizer.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    steps_per_epoch = math.ceil(len(train_chunks) / train.batch_size)
    scheduler = one_cycle(optimizer, train.lr, train.epochs * steps_per_epoch, train.warmup)
    generator = torch.Generator().manual_seed(train.seed)
    history = []
    started = time.perf_counter()
    bar = tqdm(range(train.epochs), desc="train-tokenizer", unit="epoch", disable=not (progress and world.is_main))
    for epoch in bar:
        tokenizer.train()
        order = torch.randperm(len(train_chunks), generator=generator)
        losses = []
        for start in range(0, len(order), train.batch_size):
            rows = order[start : start + train.batch_size]
            mine, weight = world.batch_share(len(rows))
            loss = model(train_chunks[rows[torch.as_tensor(mine)]]) * weight  # this rank's share of the batch mean, x world_size
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        val = evaluate_tokenizer(tokenizer, val_chunks)
        train_loss = float(world.sum(torch.tensor(losses, dtype=torch.float64)).mean()) / world.world_size  # the global batches' mean losses
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_mse_full": val["val_mse_by_layers"][-1]})
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.2e}", val=f"{history[-1]['val_mse_full']:.2e}")
    seconds = time.perf_counter() - started
    tokenizer.eval()
    if world.is_main:
        tokenizer.save(out)
    _, clipped_val = tokenizer.normalize(val_chunks, warn=False)
    report = {
        **evaluate_tokenizer(tokenizer, val_chunks),
        "train_seconds": seconds,
        "history": history,
        "train_episodes": train_ids,
        "val_episodes": val_ids,
        "train_chunks": len(train_chunks),
        "val_chunks": len(val_chunks),
        "clipped_values": {"train": clipped_train, "val": clipped_val},
        "config": to_dict(config),
        "train": to_dict(train),
        "statistics": stats.to_json(),
        "statistics_source": statistics_source,
    }
    if world.is_main:
        Path(out, "report.json").write_text(json.dumps(report, indent=2) + "\n")
        Path(out, "report.md").write_text(format_tokenizer_report(report))
    return report


def check_outliers(episodes: dict[int, np.ndarray], stats: ActionStats) -> None:
    """Refuse an action further than OUTLIER_RANGES q01..q99 ranges outside them (a corrupt value, not one to clip)."""
    low, high = np.asarray(stats.q01), np.asarray(stats.q99)
    margin = OUTLIER_RANGES * np.maximum(high - low, 1e-6)
    for episode_id, actions in episodes.items():
        far = (actions < low - margin) | (actions > high + margin)
        if far.any():
            step, dim = (int(i) for i in np.argwhere(far)[0])
            raise DataError(
                f"train-tokenizer: episode {episode_id} step {step} action dim {dim}: expected a value within {OUTLIER_RANGES:g}× "
                f"the q01..q99 range [{low[dim]:.4g}, {high[dim]:.4g}] of the training actions, got {actions[step, dim]:.4g} "
                f"({int(far.sum())} such values in this episode). Fix or drop the episode; rsd does not clip corrupt values silently."
            )


def tokenizer_loss(tokenizer: ActionTokenizer, chunks: torch.Tensor) -> torch.Tensor:
    """MSE of the full reconstruction plus PARTIAL_WEIGHT × the mean MSE with c = 1..L-1 layers (normalised units)."""
    target, _ = tokenizer.normalize(chunks, warn=False)
    errors = ((tokenizer(chunks).reconstructions - target.unsqueeze(0)) ** 2).mean(dim=(1, 2, 3))  # [L]
    partial = errors[:-1].mean() if errors.shape[0] > 1 else errors.new_zeros(())
    return errors[-1] + PARTIAL_WEIGHT * partial


@torch.no_grad()
def evaluate_tokenizer(tokenizer: ActionTokenizer, chunks: torch.Tensor) -> dict[str, Any]:
    """Validation MSE for c = 1..L, per-dimension max error (c = L) and per-layer token usage, from the tokens."""
    cfg = tokenizer.config
    tokenizer.eval()
    target, _ = tokenizer.normalize(chunks, warn=False)
    tokens = tokenizer.encode(chunks)
    decoder = tokenizer.decoder_module()
    low, high, mask = tokenizer.low, tokenizer.high, tokenizer.mask
    mse, max_error = [], None
    for layers in range(1, cfg.num_layers + 1):
        decoded = decoder(tokens[..., :layers])
        normalised = torch.where(mask, 2.0 * (decoded - low) / (high - low).clamp_min(1e-8) - 1.0, decoded)
        mse.append(float(((normalised - target) ** 2).mean()))
        max_error = (normalised - target).abs().amax(dim=(0, 1))
    usage = [torch.bincount(tokens[..., layer].flatten(), minlength=cfg.levels).tolist() for layer in range(cfg.num_layers)]
    return {"val_mse_by_layers": mse, "val_max_error_per_dim": max_error.tolist(), "token_usage": usage}


def format_tokenizer_report(report: dict[str, Any]) -> str:
    """Markdown of the tokenizer report: MSE by layers, per-dimension max error, token usage."""
    lines = ["# RFSQ tokenizer report", "", f"Trained in {report['train_seconds']:.1f} s on {report['train_chunks']} chunks; "
             f"validation: {report['val_chunks']} chunks from {len(report['val_episodes'])} held-out episodes.", "",
             "| layers c | val MSE (normalised) |", "|---|---|"]
    lines += [f"| {c} | {m:.2e} |" for c, m in enumerate(report["val_mse_by_layers"], start=1)]
    lines += ["", "Max abs error per dimension (c = L, normalised): " + ", ".join(f"{e:.4f}" for e in report["val_max_error_per_dim"]),
              "", "| layer | token usage (count per level) |", "|---|---|"]
    lines += [f"| {layer} | {' '.join(str(n) for n in counts)} |" for layer, counts in enumerate(report["token_usage"])]
    return "\n".join(lines) + "\n"


def train_tokenizer_from_file(data: str | Path | DataSource, out: str | Path, preset: str = "tiny", train: TrainConfig | None = None,
                              progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train the preset's tokenizer on the actions of an NPZ, LIBERO-layout HDF5 file or LeRobot folder (`train-tokenizer`).

    A LeRobot dataset's own q01/q99 (`meta/stats.json`) are used when present (`DataSource.statistics`).
    """
    spec = get_preset(preset)
    source = as_source(data)
    episodes, ids = read_action_episodes(source)
    own = source_statistics(source)
    return train_tokenizer(episodes, spec.tokenizer, train or spec.tokenizer_train, out, ids, progress, own.action if own else None,
                           overwrite=overwrite)
