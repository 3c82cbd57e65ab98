"""The learning-rate schedule of every training step: torch's one-cycle cosine schedule with a 5 % warm-up.

torch's `OneCycleLR` divides by zero when the warm-up is exactly one step (`0.05 * total_steps == 1`: 20 steps in
all, e.g. 10 epochs of 2 batches on a small dataset), so a short run crashed with ZeroDivisionError. A one-step
warm-up is no warm-up: there the schedule starts at the peak rate and anneals; every other length is torch's own.

Usage:
    scheduler = one_cycle(optimizer, max_lr=1e-3, total_steps=epochs * steps_per_epoch)
"""

from __future__ import annotations

import torch

from rsd.errors import DataError

WARMUP = 0.05  # share of the steps spent warming up


def one_cycle(optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """A cosine one-cycle schedule over `total_steps` optimiser steps (at least one: a DataError otherwise)."""
    if total_steps < 1:
        raise DataError(f"training: expected at least one batch to train on, got {total_steps} steps (no training examples).")
    warmup = WARMUP if float(WARMUP * total_steps) - 1 != 0 else 0.0  # torch's own phase arithmetic
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=warmup, anneal_strategy="cos")
