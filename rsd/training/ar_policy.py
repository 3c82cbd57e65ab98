"""train-ar-policy: behaviour cloning of PrismaticVLA in OpenVLA's autoregressive action mode (256 bins, 7 tokens).

Each frame's target is its own action (one action per step, as OpenVLA): q01/q99-normalised with the training
episodes' statistics, binned by OpenVLA's tokenizer, and predicted token by token with teacher forcing; the loss is
the cross-entropy over the 256 action ids at the 7 positions. The model is a preset's VLA in the "openvla" layout
(`rsd.models.ar_actions.ar_vla_config`: no proprio, no learned query). Validation is by episode: token accuracy and
the L1 error (normalised units) of the greedily decoded action; the best epoch by that error is saved.

Usage:
    rsd train-ar-policy --data runs/ar/demos.hdf5 --out runs/ar/policy --preset tiny
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

from rsd.config import TrainConfig, to_dict
from rsd.data.chunks import split_episodes
from rsd.data.dataset import FrameDataset, compute_statistics
from rsd.data.hdf5 import read_demos
from rsd.data.stats import normalize
from rsd.device import resolve_device_dtype
from rsd.errors import DataError
from rsd.io import writes_artifact
from rsd.models.ar_actions import ARActionModel, BinActionTokenizer, BinTokenizerConfig, ar_vla_config
from rsd.models.vla import PrismaticVLA
from rsd.presets import get_preset
from rsd.training.schedule import adamw, one_cycle


def action_tokens(model: ARActionModel, actions: np.ndarray) -> torch.Tensor:
    """Local action tokens `[N, A]` of un-normalised actions `[N, A]`."""
    normalized, _ = normalize(torch.as_tensor(actions, dtype=torch.float64), model.statistics.action, warn=False)
    return torch.from_numpy(model.tokenizer.to_local(model.tokenizer.encode(normalized.numpy())))


@writes_artifact("ar_policy")
def train_ar_policy(data: str | Path, out: str | Path, preset: str = "tiny", train: TrainConfig | None = None,
                    dataset_key: str | None = None, progress: bool = True, device: str | torch.device | None = None) -> dict[str, Any]:
    """Train the AR-mode VLA on the demonstrations in `data` and save the best epoch to `out` (an AR policy folder).

    `device` defaults to CUDA where it is usable (fp32 either way). `out` is written through a staging folder
    (`rsd.io.writes_artifact`); an existing AR policy there needs `overwrite=True`.
    """
    device, _ = resolve_device_dtype(device, torch.float32)
    spec = get_preset(preset)
    train = train or spec.policy_train
    torch.manual_seed(train.seed)
    config = ar_vla_config(spec.model)
    episodes = read_demos(data)
    if len(episodes) < 2:
        raise DataError(f"{data}: expected at least 2 episodes to split into training and validation, got {len(episodes)}.")
    dataset = FrameDataset(episodes, chunk_len=1)
    train_eps, val_eps = split_episodes([e.episode_id for e in episodes], train.val_fraction, train.seed)
    statistics = compute_statistics([e for e in episodes if e.episode_id in set(train_eps)])
    tokenizer = BinActionTokenizer(BinTokenizerConfig(vocab_size=config.llm.vocab_size, action_dim=statistics.action.dim))
    model = ARActionModel(PrismaticVLA(config).to(device), tokenizer, statistics, dataset_key or Path(data).stem)
    targets = action_tokens(model, dataset.all_actions()[:, 0])
    vla = model.vla
    optimizer = adamw(vla.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    train_rows = np.flatnonzero(np.isin(dataset.episode_ids, train_eps))
    val_rows = np.flatnonzero(np.isin(dataset.episode_ids, val_eps))
    steps = train.epochs * math.ceil(len(train_rows) / train.batch_size)
    scheduler = one_cycle(optimizer, train.lr, steps, train.warmup)
    rng = np.random.default_rng(train.seed)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    started = time.perf_counter()
    for epoch in range(train.epochs):
        vla.train()
        order = rng.permutation(train_rows)
        losses = []
        bar = tqdm(range(0, len(order), train.batch_size), desc=f"train-ar-policy epoch {epoch + 1}/{train.epochs}", unit="batch",
                   disable=not progress)
        for start in bar:
            rows = order[start : start + train.batch_size]
            batch = dataset.batch(rows)
            logits = model.teacher_forced_logits(vla.encode_inputs(batch.images, batch.instructions), targets[rows])
            loss = F.cross_entropy(logits.flatten(0, 1), targets[rows].to(device).flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vla.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach().item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        metrics = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), **validate_ar_policy(model, dataset, val_rows, targets),
                   "seconds": time.perf_counter() - started}
        history.append(metrics)
        if best is None or metrics["val_action_l1"] < best["val_action_l1"]:
            best = metrics
            vla.eval()
            model.save(out)
    summary = {"best": best, "history": history, "train_episodes": [int(e) for e in train_eps], "val_episodes": [int(e) for e in val_eps],
               "train": to_dict(train), "preset": preset, "seconds": time.perf_counter() - started, "fingerprint": model.fingerprint}
    (Path(out) / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@torch.inference_mode()
def greedy_tokens(model: ARActionModel, inputs: Any) -> torch.Tensor:
    """Greedy action tokens `[B, A]` by repeated teacher-forced passes (batched; equal to KV-cached greedy decoding)."""
    tokens = torch.zeros(inputs.batch_size, model.action_dim, dtype=torch.int64)
    for position in range(model.action_dim):
        tokens[:, position] = model.teacher_forced_logits(inputs, tokens)[:, position].argmax(-1).cpu()
    return tokens


@torch.inference_mode()
def validate_ar_policy(model: ARActionModel, dataset: FrameDataset, rows: np.ndarray, targets: torch.Tensor, batch_size: int = 128
                       ) -> dict[str, Any]:
    """Teacher-forced token accuracy and the L1 error (normalised units) of greedily decoded actions on frames `rows`."""
    model.vla.eval()
    correct, error, count = 0.0, 0.0, 0
    for start in range(0, len(rows), batch_size):
        index = rows[start : start + batch_size]
        batch = dataset.batch(index)
        inputs = model.vla.encode_inputs(batch.images, batch.instructions)
        logits = model.teacher_forced_logits(inputs, targets[index])
        correct += float((logits.argmax(-1).cpu() == targets[index]).float().mean(dim=1).sum())
        decoded = model.tokenizer.decode(model.tokenizer.from_local(greedy_tokens(model, inputs).numpy()))
        truth = model.tokenizer.decode(model.tokenizer.from_local(targets[index].numpy()))
        error += float(np.abs(decoded - truth).mean(axis=1).sum())
        count += len(index)
    return {"val_token_accuracy": correct / count, "val_action_l1": error / count}
