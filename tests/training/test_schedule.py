"""The one-cycle schedule of every training step (torch's own, except the run length torch divides by zero on), fused AdamW and
the weights' moving average."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rsd.config import TrainConfig
from rsd.errors import ConfigError, DataError
from rsd.presets import get_preset
from rsd.training.schedule import WeightAverage, adamw, one_cycle
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
        got = rates(one_cycle(ours, 1e-3, steps, warmup=0.05), ours, steps)
        assert all(np.isfinite(got)) and max(got) <= 1e-3 + 1e-12
        if steps == 20:  # torch: ZeroDivisionError (a warm-up of exactly one step); here: no warm-up, cosine from the peak
            assert got[0] == pytest.approx(1e-3, rel=0.01) and got == sorted(got, reverse=True)
            continue
        theirs = optimizer()
        reference = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=1e-3, total_steps=steps, pct_start=0.05, anneal_strategy="cos")
        assert got == rates(reference, theirs, steps)
    with pytest.raises(DataError, match="at least one batch"):
        one_cycle(optimizer(), 1e-3, 0, warmup=0.05)


def test_a_longer_warm_up_is_torchs_schedule_with_that_share_rising() -> None:
    for steps in (10, 37, 100):
        ours, theirs = optimizer(), optimizer()
        got = rates(one_cycle(ours, 1e-3, steps, warmup=0.2), ours, steps)
        reference = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=1e-3, total_steps=steps, pct_start=0.2, anneal_strategy="cos")
        assert got == rates(reference, theirs, steps)
        assert abs(int(np.argmax(got)) - 0.2 * steps) <= 1 and got[0] == pytest.approx(1e-3 / 25)  # torch's start: max_lr / 25
    with pytest.raises(ConfigError, match="warmup"):
        TrainConfig(warmup=1.0)


def test_tokenizer_trains_on_a_run_of_exactly_twenty_steps(tmp_path) -> None:
    """10 epochs of 2 batches: the run length that raised ZeroDivisionError in train-tokenizer."""
    spec = get_preset("tiny")
    rng = np.random.default_rng(0)
    episodes = [np.cumsum(rng.normal(0, 0.05, size=(50, 7)), axis=0).astype(np.float32) for _ in range(3)]
    train = dataclasses.replace(spec.tokenizer_train, epochs=10, batch_size=64, val_fraction=0.34)
    report = train_tokenizer(episodes, spec.tokenizer, train, tmp_path / "tokenizer", progress=False)
    assert report["train_chunks"] == 100 and len(report["history"]) == 10 and np.isfinite(report["val_mse_by_layers"]).all()


def test_adamw_is_fused_on_plain_parameters_and_steps_like_torchs_default() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    copy = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    fused, plain = adamw(model.parameters(), lr=1e-2, weight_decay=0.1), torch.optim.AdamW(copy, lr=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for step in range(5):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        for optimizer, params in ((fused, list(model.parameters())), (plain, copy)):
            optimizer.zero_grad()
            h = torch.nn.functional.gelu(x @ params[0].T + params[1]) @ params[2].T + params[3]
            h.square().mean().backward()
            optimizer.step()
    for mine, theirs in zip(model.parameters(), copy, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert not adamw([torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)], lr=1e-3, weight_decay=0.0).defaults["fused"]


def test_weight_average_follows_the_warmed_up_decay_and_restores_the_live_weights() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    average = WeightAverage([*layer.parameters(), frozen], decay=0.9)
    assert len(average.parameters) == 2  # frozen parameters are not averaged
    expected = [p.detach().clone() for p in layer.parameters()]
    for t in range(30):
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn_like(p))
        decay = min(0.9, (1 + t) / (10 + t))
        assert average.current_decay() == pytest.approx(decay)
        average.update()
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, layer.parameters(), strict=True)]
    live = [p.detach().clone() for p in layer.parameters()]
    with pytest.raises(RuntimeError, match="inside"), average.applied():
        for p, e in zip(layer.parameters(), expected, strict=True):
            torch.testing.assert_close(p.detach(), e)
        assert not torch.equal(layer.weight, live[0])
        raise RuntimeError("inside")  # the live weights come back even when evaluation fails
    for p, value in zip(layer.parameters(), live, strict=True):
        assert torch.equal(p.detach(), value)
    for decay in (0.0, 1.0):
        with pytest.raises(ConfigError, match="decay in"):
            WeightAverage(layer.parameters(), decay)
