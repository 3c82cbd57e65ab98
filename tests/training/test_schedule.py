"""The one-cycle schedule of every training step: torch's own, except the run length torch divides by zero on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rsd.errors import DataError
from rsd.presets import get_preset
from rsd.training.schedule import one_cycle
from rsd.training.tokenizer import train_tokenizer


def rates(scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    """The learning rate of every step of a run of `steps` steps."""
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)


def test_every_run_length_is_scheduled_and_matches_torch_where_torch_works() -> None:
    for steps in range(1, 61):
        ours = optimizer()
        got = rates(one_cycle(ours, 1e-3, steps), ours, steps)
        assert all(np.isfinite(got)) and max(got) <= 1e-3 + 1e-12
        if steps == 20:  # torch: ZeroDivisionError (a warm-up of exactly one step); here: no warm-up, cosine from the peak
            assert got[0] == pytest.approx(1e-3, rel=0.01) and got == sorted(got, reverse=True)
            continue
        theirs = optimizer()
        reference = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=1e-3, total_steps=steps, pct_start=0.05, anneal_strategy="cos")
        assert got == rates(reference, theirs, steps)
    with pytest.raises(DataError, match="at least one batch"):
        one_cycle(optimizer(), 1e-3, 0)


def test_tokenizer_trains_on_a_run_of_exactly_twenty_steps(tmp_path) -> None:
    """10 epochs of 2 batches: the run length that raised ZeroDivisionError in train-tokenizer."""
    spec = get_preset("tiny")
    rng = np.random.default_rng(0)
    episodes = [np.cumsum(rng.normal(0, 0.05, size=(50, 7)), axis=0).astype(np.float32) for _ in range(3)]
    train = dataclasses.replace(spec.tokenizer_train, epochs=10, batch_size=64, val_fraction=0.34)
    report = train_tokenizer(episodes, spec.tokenizer, train, tmp_path / "tokenizer", progress=False)
    assert report["train_chunks"] == 100 and len(report["history"]) == 10 and np.isfinite(report["val_mse_by_layers"]).all()
