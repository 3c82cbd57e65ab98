"""The optimiser and learning-rate schedule of every training step: AdamW and torch's one-cycle cosine schedule
with a warm-up (`TrainConfig.warmup`, 5 % of the steps by default); and the moving average of the weights a policy
is evaluated and saved with.

`adamw` takes torch's fused AdamW kernel wherever it applies (plain CPU or CUDA parameters; FSDP's sharded
DTensors keep the default): on the CPU it is one pass over the parameters instead of a dozen tensor ops each, and
the optimiser step of the `tiny` policy drops from about 12 to 5 ms of a 120 ms training step.

torch's `OneCycleLR` divides by zero when the warm-up is exactly one step (`warmup * total_steps == 1`, e.g. 5 % of
20 steps: 10 epochs of 2 batches on a small dataset), so a short run crashed with ZeroDivisionError. A one-step
warm-up is no warm-up: there the schedule starts at the peak rate and anneals; every other length is torch's own.

Usage:
    optimizer = adamw(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = one_cycle(optimizer, max_lr=1e-3, total_steps=epochs * steps_per_epoch, warmup=train.warmup)
    average = WeightAverage(model.parameters(), decay=0.999)   # average.update() after each optimizer.step()
    with average.applied():                                     # the averaged weights, to validate and save
        ...
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from rsd.errors import ConfigError, DataError


def one_cycle(optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int, warmup: float) -> torch.optim.lr_scheduler.OneCycleLR:
    """A cosine one-cycle schedule over `total_steps` optimiser steps (at least one: a DataError otherwise), the first
    `warmup` share of them rising to `max_lr`."""
    if total_steps < 1:
        raise DataError(f"training: expected at least one batch to train on, got {total_steps} steps (no training examples).")
    warmup = warmup if float(warmup * total_steps) - 1 != 0 else 0.0  # torch's own phase arithmetic
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=warmup, anneal_strategy="cos")


def adamw(parameters: Iterable[nn.Parameter], lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over `parameters`, fused into one kernel when they are all plain CPU or CUDA floating-point tensors."""
    parameters = list(parameters)
    fused = bool(parameters) and all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused or None)


class WeightAverage:
    """An exponential moving average of parameters (Polyak averaging, as Diffusion Policy's EMA): the averaged
    weights are what a behaviour-cloning policy is evaluated and saved with, smoother than the last step's.

    The decay warms up as `min(decay, (1 + t) / (10 + t))` after `t` updates (TensorFlow's and timm's rule), so the
    first steps, far from any good weights, leave the average quickly. The average lives beside the parameters, with
    their device, dtype and (under FSDP) sharding; `applied()` copies it in and the live weights back afterwards.
    """

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"WeightAverage: expected a decay in (0, 1), got {decay}.")
        self.parameters = [p for p in parameters if p.requires_grad]
        self.decay = decay
        self.updates = 0
        with torch.no_grad():
            self.average = [p.detach().clone() for p in self.parameters]

    def current_decay(self) -> float:
        """The decay the next update uses (the warm-up rule)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def update(self) -> None:
        """Move the average toward the parameters' current values (call after each optimiser step)."""
        get_ema_multi_avg_fn(self.current_decay())(self.average, [p.detach() for p in self.parameters], None)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside: the parameters hold the average; on leaving they hold their live values again."""
        with torch.no_grad():
            live = [p.detach().clone() for p in self.parameters]
            for parameter, average in zip(self.parameters, self.average, strict=True):
                parameter.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters, live, strict=True):
                    parameter.copy_(value)
