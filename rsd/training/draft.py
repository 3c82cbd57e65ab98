"""train-draft: fit the input projection and the draft head to the frozen main model's coarse tokens.

Distillation (docs/architecture.md, "Data flow"): targets are the main model's own tokens by default
(`targets="main"`) or the ground-truth chunk's tokens (`targets="ground_truth"`), and the loss is

    CE(draft, targets) + 0.8 * KL(main || draft) + 0.3 * acceptance loss

where, per coarse token with main distribution p and draft distribution q over the V levels, the
acceptance loss is `1 - sum_v min(p_v, q_v)` = the total-variation distance between p and q. That is the
probability that speculative sampling rejects a token drafted from q when the target is p (accept
with probability min(1, p(x)/q(x))); it is averaged over the C * H * d coarse tokens and the batch.

The validation split is by episode. Each epoch logs loss, per-layer accuracy against the targets and the
agreement with the main model (per token and whole coarse chunk) to `metrics.json`; the best epoch by
validation agreement is saved as `draft.safetensors` + `draft.json`.

Under torchrun the draft is trained with DDP: every rank walks the same seeded batches and computes its slice of
each (`rsd.distributed.World.batch_share`), the training loss is summed over the ranks, every rank validates
on all held-out frames (cheap next to training), and rank 0 alone writes.

Usage:
    rsd train-draft --features runs/demo/features --out runs/demo/draft
    torchrun --nproc-per-node 2 -m rsd.cli train-draft --features runs/demo/features --out runs/demo/draft
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rsd import distributed
from rsd.config import DraftConfig, TrainConfig, to_dict
from rsd.data.chunks import split_episodes
from rsd.errors import ConfigError
from rsd.io import writes_artifact
from rsd.models.draft import DraftHead
from rsd.presets import get_preset
from rsd.training.features import Features, episode_ids, load_features
from rsd.training.schedule import adamw, one_cycle

Targets = Literal["main", "ground_truth"]


def distillation_loss(
    logits: torch.Tensor, main_logits: torch.Tensor, targets: torch.Tensor, kl_weight: float = 0.8, accept_weight: float = 0.3
) -> tuple[torch.Tensor, dict[str, float]]:
    """CE + kl_weight * KL(main || draft) + accept_weight * TV(main, draft) over logits `[B, C, T, V]`."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    log_p = F.log_softmax(main_logits.float(), dim=-1)
    p = log_p.exp()
    ce = F.nll_loss(log_q.flatten(0, 2), targets.flatten())
    kl = (p * (log_p - log_q)).sum(-1).mean()
    accept = (1.0 - torch.minimum(p, log_q.exp()).sum(-1)).mean()
    loss = ce + kl_weight * kl + accept_weight * accept
    return loss, {"ce": ce.detach().item(), "kl": kl.detach().item(), "accept": accept.detach().item()}


@writes_artifact("draft")
def train_draft(
    features: str | Path,
    out: str | Path,
    preset: str = "tiny",
    train: TrainConfig | None = None,
    targets: Targets = "main",
    kl_weight: float = 0.8,
    accept_weight: float = 0.3,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a draft on a features folder and write the best checkpoint and `metrics.json` to `out`.

    `out` is written through a staging folder (`rsd.io.writes_artifact`); an existing draft there needs `overwrite=True`.
    """
    if targets not in ("main", "ground_truth"):
        raise ConfigError(f"train-draft --targets: expected 'main' or 'ground_truth', got {targets!r}.")
    spec = get_preset(preset)
    train = train or spec.draft_train
    feats = load_features(features)
    tok = feats.tokenizer.config
    config = DraftConfig(
        hidden_size=int(feats.index["hidden_size"]),
        exit_layer=feats.exit_layer,
        tokenizer=tok,
        width=spec.draft_width,
        num_heads=spec.draft_heads,
        ffn_size=spec.draft_ffn,
    )
    torch.manual_seed(train.seed)
    train_eps, val_eps = split_episodes(episode_ids(feats), train.val_fraction, train.seed)
    train_rows, val_rows = feats.rows(train_eps), feats.rows(val_eps)
    draft = DraftHead(config)
    world = distributed.current()
    model = distributed.Parallel(draft, DraftHead.forward_logits)
    optimizer = adamw(draft.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    steps_per_epoch = math.ceil(len(train_rows) / train.batch_size)
    scheduler = one_cycle(optimizer, train.lr, train.epochs * steps_per_epoch, train.warmup)
    target_tokens = (feats.main_tokens if targets == "main" else feats.gt_tokens)[:, : tok.coarse_layers]
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    generator = torch.Generator().manual_seed(train.seed)
    bar = tqdm(range(train.epochs), desc="train-draft", unit="epoch", disable=not (progress and world.is_main))
    for epoch in bar:
        draft.train()
        order = train_rows[torch.randperm(len(train_rows), generator=generator)]
        losses = []
        for start in range(0, len(order), train.batch_size):
            rows = order[start : start + train.batch_size]
            mine, weight = world.batch_share(len(rows))
            rows = rows[torch.as_tensor(mine)]
            logits = model(feats.exit_hidden[rows].float())
            loss, _ = distillation_loss(logits, feats.main_logits[rows], target_tokens[rows], kl_weight, accept_weight)
            loss = loss * weight  # this rank's share of the global batch's mean loss, times world_size
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach().item())
        train_loss = float(world.sum(torch.tensor(losses, dtype=torch.float64)).mean()) / world.world_size  # the global batches' mean losses
        metrics = {"epoch": epoch, "train_loss": train_loss, **evaluate_draft(draft, feats, val_rows, target_tokens, kl_weight, accept_weight)}
        history.append(metrics)
        bar.set_postfix(val_agree=f"{metrics['val_agreement']:.3f}", loss=f"{metrics['train_loss']:.3f}")
        if best is None or metrics["val_agreement"] > best["val_agreement"]:
            best = metrics
            draft.eval()
            if world.is_main:
                draft.save(
                    out,
                    {
                        "main_fingerprint": feats.index["main_fingerprint"],
                        "targets": targets,
                        "train": to_dict(train),
                        "train_episodes": [int(e) for e in train_eps],
                        "val_episodes": [int(e) for e in val_eps],
                        "best": metrics,
                        "parameters": draft.num_parameters(),
                    },
                )
    summary = {"best": best, "history": history, "parameters": draft.num_parameters(), "exit_layer": config.exit_layer}
    if world.is_main:
        (Path(out) / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@torch.inference_mode()
def evaluate_draft(
    draft: DraftHead, feats: Features, rows: torch.Tensor, target_tokens: torch.Tensor, kl_weight: float = 0.8, accept_weight: float = 0.3
) -> dict[str, Any]:
    """Validation loss, per-layer accuracy against the targets and agreement with the main model on `rows`."""
    draft.eval()
    tok = feats.tokenizer.config
    logits = torch.cat([draft.forward_logits(feats.exit_hidden[rows[i : i + 512]].float()) for i in range(0, len(rows), 512)])
    loss, parts = distillation_loss(logits, feats.main_logits[rows], target_tokens[rows], kl_weight, accept_weight)
    predicted = logits.argmax(-1)
    main_coarse = feats.main_tokens[rows, : tok.coarse_layers]
    per_layer = (predicted == target_tokens[rows]).float().mean(dim=(0, 2))
    agree = predicted == main_coarse
    return {
        "val_loss": float(loss),
        "val_parts": parts,
        "val_layer_accuracy": [float(a) for a in per_layer],
        "val_agreement": float(agree.float().mean()),
        "val_chunk_agreement": float(agree.flatten(1).all(dim=1).float().mean()),
    }
