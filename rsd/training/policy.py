"""train-policy: behaviour cloning of PrismaticVLA + RFSQ head on the RFSQ tokens of demonstration chunks.

Each frame's target is the tokenizer's tokens of the H-step action chunk starting at that frame (all L
residual layers); the loss is the cross-entropy over tokens, weighted per layer. The tokenizer is frozen and
its action statistics are the policy's, so un-normalisation at run time is exactly the inverse of what
training saw; proprio statistics come from the training episodes (or the dataset's own, as for the tokenizer).
`data` is an HDF5 file or a LeRobot folder with its key mapping (`rsd.data.source.DataSource`); its cameras and
proprio must match what the preset's model takes. The validation split is by episode and
reports per-layer token accuracy and the decoded-action error against the demonstrated chunk. The per-layer
cross-entropies are weighted by `policy_layer_weights` (coarse layers count more).
Where the data records the simulator's object state (`obs/object`) and `options.object_loss > 0`, a small head
(`ObjectStateHead`, training-time only, never saved) regresses it, standardised, from the same query hidden and its
mean squared error joins the loss at that weight. The action loss alone says "left" or "right" of a target far away
(the expert's actions saturate); the object state says where the named block is at every frame, so the policy
learns to localise it with far fewer steps.
`freeze_backbone=True` trains only the head (for big frozen backbones). `cogvla` adds CogVLA's modules to the preset's
model; with `adapter` and `base` the base policy is fine-tuned the CogVLA way instead (LoRA on the LLM via peft, new
modules and the head in full, vision frozen; `rsd.models.lora`) and `out/lora` holds the three-part checkpoint.

Under torchrun the policy trains data-parallel (`parallel="ddp"`, or `"fsdp"` to shard the trained parameters
when the model does not fit one device): every rank draws the same global batches and augmentation and computes
its slice of each (`rsd.distributed.World.batch_share`), validation frames and rollout seeds are spread over the
ranks and their sums reduced, and rank 0 alone writes.

Usage:
    rsd train-policy --data runs/demo/demos.hdf5 --tokenizer runs/demo/tokenizer --preset tiny --out runs/demo/policy
    rsd train-policy --data D --tokenizer P/tokenizer --preset tiny-vit --base P --lora-rank 8 --aggregation-tokens 4 --lfp-layers 2,4 --out Q
    torchrun --nproc-per-node 2 -m rsd.cli train-policy --data ... --tokenizer ... --out ... [--parallel fsdp]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rsd import distributed
from rsd.config import AdapterConfig, CogVLAConfig, PolicyTrainConfig, TrainConfig, to_dict
from rsd.data.chunks import split_episodes
from rsd.data.dataset import FrameDataset, compute_statistics
from rsd.data.hdf5 import read_env_spec
from rsd.data.source import DataSource, as_source, read_episodes, source_statistics
from rsd.data.stats import DatasetStatistics
from rsd.device import cpu_compiler
from rsd.envs.base import is_env_name
from rsd.errors import ConfigError, DataError, ShapeError
from rsd.io import writes_artifact
from rsd.models.heads import ObjectStateHead
from rsd.models.lora import build_policy_model
from rsd.models.main import MainModel
from rsd.models.processor import VLAInputs
from rsd.presets import get_preset
from rsd.tokenizer import ActionTokenizer, tokens_to_layers
from rsd.training.augment import random_shift
from rsd.training.risk import binomial_cdf
from rsd.training.schedule import WeightAverage, adamw, one_cycle

log = logging.getLogger(__name__)


@writes_artifact("policy")
def train_policy(
    data: str | Path | DataSource,
    tokenizer: str | Path,
    out: str | Path,
    preset: str = "tiny",
    train: TrainConfig | None = None,
    freeze_backbone: bool = False,
    dataset_key: str | None = None,
    progress: bool = True,
    options: PolicyTrainConfig | None = None,
    rollout_env: str | None = None,
    cogvla: CogVLAConfig | None = None,
    adapter: AdapterConfig | None = None,
    base: str | Path | None = None,
    parallel: str = "ddp",
    init: str | Path | None = None,
) -> dict[str, Any]:
    """Train the main policy on the demonstrations in `data` and save the selected epoch to `out`.

    With `options.select_by == "rollouts"` the policy is run closed-loop every `rollout_every` epochs on
    held-out seeds of `rollout_env` (default: the environment recorded in the data file), and each evaluated epoch
    replaces the kept one unless the kept one succeeded on significantly more of the same seeds
    (`significantly_better`, `options.select_alpha`): the latest epoch the rollouts cannot tell apart from the best is
    kept, not the winner of a noisy comparison; otherwise the epoch with the lowest validation L1.
    With `options.ema_decay` the weights validated, rolled out and saved are a moving average of the trained ones
    (`rsd.training.schedule.WeightAverage`), which training itself never sees.
    With `init` (a policy folder) training starts from that policy's weights and keeps its normalisation statistics
    (DAgger's usual step: go on training the learner on the aggregated data); its model and tokenizer must be the
    ones this run would build.
    `out` is written through a staging folder (`rsd.io.writes_artifact`); an existing policy there needs `overwrite=True`.
    """
    spec = get_preset(preset)
    train = train or spec.policy_train
    options = options or spec.policy_options
    source = as_source(data)
    rollout_spec = _rollout_env(source, rollout_env) if options.select_by == "rollouts" else None
    torch.manual_seed(train.seed)
    action_tokenizer = ActionTokenizer.load(tokenizer)
    if action_tokenizer.config != spec.model.tokenizer:
        raise ConfigError(f"train-policy: the tokenizer's shape {action_tokenizer.config} differs from preset {preset!r}'s {spec.model.tokenizer}.")
    replan = options.rollout_replan_every
    if rollout_spec is not None and replan is not None and replan > action_tokenizer.config.chunk_len:
        raise ConfigError(f"train-policy --rollout-replan-every: expected at most the chunk length {action_tokenizer.config.chunk_len}, "
                          f"got {replan} (checked before training, not at the first selection rollout).")
    episodes = read_episodes(source)
    if len(episodes) < 2:
        raise DataError(f"{source.path}: expected at least 2 episodes to split into training and validation, got {len(episodes)}.")
    dataset = FrameDataset(episodes, action_tokenizer.config.chunk_len)
    model_config = spec.model
    if len(dataset.cameras) != model_config.num_images:  # the model reads every chosen camera (e.g. agentview + wrist)
        log.info("train-policy: %s holds %d cameras %s; the model reads %d images per observation.", source.path, len(dataset.cameras),
                 dataset.cameras, len(dataset.cameras))
        model_config = dataclasses.replace(model_config, num_images=len(dataset.cameras))
    _check_proprio(source, dataset, model_config.proprio_dim, preset)
    train_eps, val_eps = split_episodes([e.episode_id for e in episodes], train.val_fraction, train.seed)
    train_stats = compute_statistics([e for e in episodes if e.episode_id in set(train_eps)])
    own = source_statistics(source)
    statistics = DatasetStatistics(
        action=action_tokenizer.stats,
        proprio=own.proprio if own is not None and own.proprio is not None else train_stats.proprio,
        num_transitions=train_stats.num_transitions,
        num_trajectories=train_stats.num_trajectories,
    )
    if adapter is not None and freeze_backbone:
        raise ConfigError("train-policy: --freeze-backbone and LoRA fine-tuning (--lora-rank) exclude each other.")
    if init is None:
        main = build_policy_model(model_config, action_tokenizer, statistics, dataset_key or Path(source.path).stem, cogvla, adapter, base)
    else:
        main = _warm_start(init, dataclasses.replace(model_config, cogvla=cogvla) if cogvla is not None else model_config, action_tokenizer,
                           adapter)
    main.tokenizer.requires_grad_(False)
    if freeze_backbone:
        main.vla.requires_grad_(False)
    world = distributed.current()
    train_rows = np.flatnonzero(np.isin(dataset.episode_ids, train_eps))
    val_rows = np.flatnonzero(np.isin(dataset.episode_ids, val_eps))
    object_targets = _object_targets(dataset, train_rows, source.path) if options.object_loss > 0 else None
    if object_targets is not None:  # training-time only: `MainModel.save` writes the VLA and the RFSQ head, not this
        main.object_head = ObjectStateHead(main.hidden_size, object_targets.shape[1])
    forward = training_outputs
    if options.compile:
        if next(main.parameters()).device.type == "cpu" and cpu_compiler() is None:
            raise ConfigError("train-policy --compile: torch.compile builds CPU kernels with a C++ compiler ($CXX or g++) against "
                              "Python's headers (Python.h), and one of them is missing; install them or train without --compile.")
        full_batch = len(world.batch_share(min(train.batch_size, len(train_rows)))[0])
        forward = static_compiled(main, training_outputs, full_batch, prompt_length(main, {e.instruction for e in episodes}))
    model = distributed.Parallel(main, forward, parallel, find_unused_parameters=True)  # the VLA's lm_head is off the action path
    trainable = [p for p in main.parameters() if p.requires_grad]
    optimizer = adamw(trainable, lr=train.lr, weight_decay=train.weight_decay)
    with torch.no_grad():
        targets = tokens_to_layers(action_tokenizer.encode(torch.as_tensor(dataset.all_actions(), dtype=torch.float32)))
    layer_weights = policy_layer_weights(action_tokenizer)
    steps = train.epochs * math.ceil(len(train_rows) / train.batch_size)
    scheduler = one_cycle(optimizer, train.lr, steps, train.warmup)
    average = WeightAverage(trainable, options.ema_decay) if options.ema_decay else None
    rng = np.random.default_rng(train.seed)
    augment_rng = np.random.default_rng([train.seed, 1])
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    started = time.perf_counter()
    for epoch in range(train.epochs):
        main.train()
        main.tokenizer.eval()
        order = rng.permutation(train_rows)
        losses, object_losses = [], []
        bar = tqdm(range(0, len(order), train.batch_size), desc=f"train-policy epoch {epoch + 1}/{train.epochs}", unit="batch", disable=not (progress and world.is_main))
        for start in bar:
            rows = order[start : start + train.batch_size]
            batch = dataset.batch(rows)
            images = random_shift(batch.images, options.shift, augment_rng)  # the whole batch: every rank draws the same shifts
            mine, weight = world.batch_share(len(rows))
            proprio = None if batch.proprio is None else batch.proprio[mine]
            logits, objects = model(main.prepare(images[mine], [batch.instructions[i] for i in mine], proprio))
            loss = token_loss(logits, targets[rows[mine]], layer_weights)
            if objects is not None:
                object_loss = F.mse_loss(objects, object_targets[rows[mine]])
                object_losses.append(object_loss.detach().item() * weight)  # weighted as `losses`: their ranks' sum is the batch mean
                loss = loss + options.object_loss * object_loss
            loss = loss * weight  # this rank's share of the batch mean, x world_size
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            if average is not None:
                average.update()
            losses.append(loss.detach().item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        train_loss = _global_mean(losses)  # the global batches' mean losses
        with average.applied() if average is not None else nullcontext():  # the weights validated, rolled out and saved
            # FSDP: whole parameters on every rank while they validate different frames and seeds; compiled layers run eagerly
            with model.gathered(), torch.compiler.set_stance("force_eager"):
                fit = validate_policy(main, dataset, train_rows[:: max(1, len(train_rows) // 512)], targets)
                metrics = {"epoch": epoch + 1, "train_loss": train_loss,
                           **validate_policy(main, dataset, val_rows, targets, object_targets=object_targets),
                           "train_action_l1_per_dim": fit["val_action_l1_per_dim"], "seconds": time.perf_counter() - started}
                if object_targets is not None:
                    metrics["train_object_mse"] = _global_mean(object_losses)
                if rollout_spec is not None and ((epoch + 1) % options.rollout_every == 0 or epoch + 1 == train.epochs):
                    outcomes = rollout_outcomes(main, rollout_spec, options)
                    metrics["rollout_success"] = float(outcomes.mean())
                    metrics["rollout_outcomes"] = [int(o) for o in outcomes]
            history.append(metrics)
            if rollout_spec is not None and "rollout_success" not in metrics:
                continue
            if rollout_spec is not None:
                keep = best is None or not significantly_better(np.array(best["rollout_outcomes"]), np.array(metrics["rollout_outcomes"]),
                                                                options.select_alpha)
            else:
                keep = best is None or metrics["val_action_l1"] < best["val_action_l1"]
            if keep:
                best = metrics
                main.eval()
                if (saved := model.for_saving()) is not None:  # rank 0: `main` itself, or under FSDP its gathered copy
                    main.fingerprint = saved.eval().save(out)
    summary = {
        "best": best,
        "history": history,
        "train_episodes": [int(e) for e in train_eps],
        "val_episodes": [int(e) for e in val_eps],
        "train": to_dict(train),
        "options": to_dict(options),
        "rollout_env": None if rollout_spec is None else {"env": rollout_spec[0], "env_kwargs": rollout_spec[1]},
        "preset": preset,
        "freeze_backbone": freeze_backbone,
        "object_state_dims": None if object_targets is None else int(object_targets.shape[1]),
        "cogvla": to_dict(main.vla.config.cogvla),
        "adapter": None if adapter is None else {**to_dict(adapter), "base": str(base)},
        "seconds": time.perf_counter() - started,
        "steps": steps,
        "fingerprint": world.gather(main.fingerprint)[0],
    }
    if world.is_main:
        (Path(out) / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _warm_start(init: str | Path, model_config: Any, tokenizer: ActionTokenizer, adapter: AdapterConfig | None) -> MainModel:
    """The policy at `init`, to go on training: its model must be `model_config` and its tokenizer `tokenizer`."""
    if adapter is not None:
        raise ConfigError("train-policy: --init (go on training a policy) and LoRA fine-tuning (--lora-rank, --base) exclude each other.")
    main = MainModel.load(init)
    if main.vla.config != model_config:
        raise ConfigError(f"train-policy --init {init}: expected a policy of the model this run builds ({model_config}), got {main.vla.config}.")
    if not main.tokenizer.same_as(tokenizer):
        raise ConfigError(f"train-policy --init {init}: its tokenizer differs from --tokenizer; the token targets would change meaning.")
    return main


def _rollout_env(source: DataSource, rollout_env: str | None) -> tuple[str, dict[str, Any]]:
    """The environment (name, kwargs) checkpoint selection runs in: `rollout_env`, else the one an HDF5 data file names."""
    recorded = read_env_spec(source.path) if source.format == "hdf5" else None
    if recorded is not None and not is_env_name(recorded[0]):  # e.g. a file converted from a LeRobot folder
        recorded = None
    if rollout_env is not None:
        kwargs = recorded[1] if recorded is not None and recorded[0] == rollout_env else {}
        return rollout_env, kwargs
    if recorded is None:
        raise ConfigError(f"train-policy: selection by rollouts needs an environment, but {source.path} records none (HDF5 data.attrs['env_args']); "
                          "pass --rollout-env (e.g. robosuite:Lift) or --select-by val_l1.")
    return recorded


def rollout_outcomes(main: MainModel, env: tuple[str, dict[str, Any]], options: PolicyTrainConfig) -> np.ndarray:
    """Closed-loop success `[N]` (1 or 0, in seed order) of `main` (main-only) on the `N = options.rollout_episodes` selection
    seeds of `env`."""
    from rsd.envs.evaluate import evaluate
    from rsd.runtime.policy import MainOnlyPolicy

    main.eval()
    seeds = list(range(options.rollout_seed, options.rollout_seed + options.rollout_episodes))
    world = distributed.current()  # each rank plays its share of the seeds
    mine = world.shard(seeds)
    report = evaluate(MainOnlyPolicy(main, options.rollout_replan_every), env[0], mine, progress=False, env_kwargs=env[1],
                      batch=options.rollout_batch) if mine else None
    outcomes = torch.zeros(len(seeds), dtype=torch.float64)  # this rank's seeds filled in; the sum over ranks fills every one
    for episode in [] if report is None else report.episodes:
        outcomes[seeds.index(episode.seed)] = float(episode.success)
    main.train()
    main.tokenizer.eval()
    return world.sum(outcomes).numpy()


def significantly_better(kept: np.ndarray, later: np.ndarray, alpha: float) -> bool:
    """Whether the kept epoch's selection rollouts `kept [N]` beat a later epoch's `later [N]` (1/0 on the same seeds) beyond
    their noise: a one-sided exact sign test on the seeds where the two differ, p < `alpha` (never, with alpha 0)."""
    if kept.shape != later.shape:
        raise ShapeError(f"significantly_better: expected outcomes on the same seeds, got shapes {kept.shape} and {later.shape}.")
    only_kept, only_later = int(np.sum((kept > 0) & (later <= 0))), int(np.sum((later > 0) & (kept <= 0)))
    differing = only_kept + only_later
    return only_kept > 0 and 1.0 - binomial_cdf(only_kept - 1, differing, 0.5) < alpha


def training_outputs(main: MainModel, inputs: VLAInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training step's forward: RFSQ logits `[B, L, H*d, V]` of prepared inputs, and the predicted object state
    `[B, S]` where training gave the model an `object_head` (else None)."""
    hidden = main.vla(inputs)
    object_head = getattr(main, "object_head", None)
    return main.head(hidden), None if object_head is None else object_head(hidden)


def prompt_length(main: MainModel, instructions: set[str]) -> int:
    """The longest prompt, in tokens, of these instructions under `main`'s processor (which pads a batch to its longest)."""
    return int(main.vla.processor.prompts(sorted(instructions), len(instructions))[0].shape[1])


def static_compiled(main: MainModel, function: Any, batch_size: int, prompt_tokens: int) -> Any:
    """`function(main, inputs)` with `main`'s Llama decoder layers compiled by torch.compile for one static shape:
    batches of `batch_size` rows, prompts right-padded to `prompt_tokens` (`VLAInputs.pad_prompt`: the same result).

    The layers are identical, so inductor compiles one small graph for all of them (20-30 s cold on 2 cores; a graph of the
    whole forward took 114 s). Other batch sizes (an epoch's last, partial batch) run eagerly, as must every
    other use of `main` while its layers are compiled (`torch.compiler.set_stance("force_eager")`).
    """
    for layer in main.vla.layers:
        layer.compile(dynamic=False)

    def forward(module: MainModel, inputs: VLAInputs) -> Any:
        if inputs.input_ids.shape[0] != batch_size:
            with torch.compiler.set_stance("force_eager"):
                return function(module, inputs)
        return function(module, inputs.pad_prompt(prompt_tokens))

    return forward


def _global_mean(values: list[float]) -> float:
    """The mean over the epoch's global batches of per-rank values already weighted by `World.batch_share`."""
    world = distributed.current()
    return float(world.sum(torch.tensor(values, dtype=torch.float64)).mean()) / world.world_size


def _object_targets(dataset: FrameDataset, train_rows: np.ndarray, path: str | Path) -> torch.Tensor | None:
    """Every frame's object state `[N, S]` standardised by the training frames' mean and std, or None (logged) when
    the data records none."""
    states = dataset.all_object_states()
    if states is None:
        log.info("train-policy: %s records no object state (obs/object); training without the object-state loss.", path)
        return None
    mean, std = states[train_rows].mean(axis=0), states[train_rows].std(axis=0)
    return torch.as_tensor((states - mean) / np.maximum(std, 1e-6), dtype=torch.float32)


def _check_proprio(source: DataSource, dataset: FrameDataset, proprio_dim: int, preset: str) -> None:
    """The data's proprio width against what the preset's model takes, before any training."""
    proprio = dataset.episodes[0].proprio
    width = 0 if proprio is None else proprio.shape[1]
    if width != proprio_dim:
        raise DataError(f"{source.path}: preset {preset!r} takes proprio of {proprio_dim} dims, the data gives {width}; "
                        "choose keys with --proprio-keys, or none with --proprio-keys none (DataSource.proprio_keys), or a preset that "
                        "matches (tiny-no-proprio takes none).")


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
def validate_policy(main: MainModel, dataset: FrameDataset, rows: np.ndarray, targets: torch.Tensor, batch_size: int = 128,
                    object_targets: torch.Tensor | None = None) -> dict[str, Any]:
    """Per-layer token accuracy and decoded-action L1 (normalised units) of `main` on frames `rows` (spread over the ranks);
    with `object_targets` `[N, S]` and a training-time `object_head`, also its mean squared error (standardised units)."""
    main.eval()
    world = distributed.current()
    rows = np.asarray(world.shard(rows), dtype=np.int64)
    correct = torch.zeros(main.tokenizer.config.num_layers)
    action_error, count = torch.zeros(main.tokenizer.config.action_dim, dtype=torch.float64), 0
    object_error = torch.zeros((), dtype=torch.float64)
    scale = main.tokenizer.stats.normalized_scale()
    for start in range(0, len(rows), batch_size):
        index = rows[start : start + batch_size]
        batch = dataset.batch(index)
        logits, objects = training_outputs(main, main.prepare(batch.images, batch.instructions, batch.proprio))
        correct += (logits.argmax(-1) == targets[index]).float().mean(dim=2).sum(dim=0)
        predicted = main.decode_logits(logits)
        truth = torch.as_tensor(batch.actions, dtype=torch.float32)
        action_error += ((predicted - truth).abs() * scale).mean(dim=1).sum(dim=0).double()
        if objects is not None and object_targets is not None:
            object_error += ((objects - object_targets[index]) ** 2).mean(dim=1).sum().double()
        count += len(index)
    correct, action_error, count = world.sum(correct), world.sum(action_error), int(world.sum(torch.tensor(count)))
    per_dim = action_error / count
    metrics = {"val_layer_accuracy": [float(c) / count for c in correct], "val_action_l1": float(per_dim.mean()),
               "val_action_l1_per_dim": [round(float(v), 4) for v in per_dim]}
    if object_targets is not None and getattr(main, "object_head", None) is not None:
        metrics["val_object_mse"] = float(world.sum(object_error)) / count
    return metrics
