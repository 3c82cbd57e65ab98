"""Benchmark timing: milliseconds of repeated calls, interleaved A/B comparisons with a bootstrap interval, the hardware card.

A ratio of two latencies measured at different moments on a busy machine says more about the load than about the
code (a 21x "speed-up" from stages timed one after another, against 0.91x measured side by side). So headline
ratios come from `interleaved` calls on the same inputs (a, b, c, a, b, c, ...: a change of load hits every
candidate alike) and `ratio_ci` gives the ratio of medians with a paired bootstrap interval; `spread` (p90/p50)
above `NOISY_SPREAD` means the machine was too noisy to trust the numbers. Every timer takes a `clock`
(seconds, `time.perf_counter` by default) so tests can drive it with a deterministic fake one.

Usage:
    times = time_calls(lambda: model(inputs), iters=50, warmup=10, device=torch.device("cpu"))   # list of ms
    runs = interleaved({"baseline": base, "speculative": spec}, iters=50, warmup=10, device=torch.device("cpu"))
    ratio_ci(runs["speculative"], runs["baseline"])     # {"ratio": 0.71, "low": 0.68, "high": 0.74, "level": 0.95}
    card = hardware_card(torch.device("cpu"), torch.float32)
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from rsd.device import dtype_name
from rsd.errors import ShapeError
from rsd.runtime.timing import synchronize

NOISY_SPREAD = 1.5  # p90/p50 of a measured series above this: the machine was too busy for its ratios to be trusted
BOOTSTRAP_RESAMPLES = 2000  # resamples of the paired bootstrap interval


def time_calls(fn: Callable[[], Any], iters: int, warmup: int, device: torch.device,
               clock: Callable[[], float] | None = None) -> list[float]:
    """Milliseconds of `iters` calls of `fn` after `warmup` untimed calls (CUDA events on the GPU unless a `clock` is given)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda" and clock is None:
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times
    clock = clock or time.perf_counter
    for _ in range(iters):
        begin = clock()
        fn()
        times.append((clock() - begin) * 1e3)
    return times


def interleaved(fns: dict[str, Callable[[], Any]], iters: int, warmup: int, device: torch.device,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Milliseconds of each candidate, called in turn (a, b, c, a, b, c, ...) `iters` times after `warmup` rounds.

    CUDA is synchronised around every call, so each time covers its own GPU work.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            synchronize(device)
            begin = clock()
            fn()
            synchronize(device)
            times[name].append((clock() - begin) * 1e3)
    return times


def ratio_ci(numerator: list[float] | np.ndarray, denominator: list[float] | np.ndarray, level: float = 0.95,
             seed: int = 0) -> dict[str, float]:
    """median(numerator) / median(denominator) with a paired bootstrap interval (the iterations are resampled together)."""
    top, bottom = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if top.shape != bottom.shape or top.size == 0:
        raise ShapeError(f"ratio_ci: expected two series of one non-zero length (paired calls), got {top.shape} and {bottom.shape}.")
    rows = np.random.default_rng(seed).integers(0, top.size, size=(BOOTSTRAP_RESAMPLES, top.size))
    ratios = np.median(top[rows], axis=1) / np.median(bottom[rows], axis=1)
    low, high = np.percentile(ratios, [50 * (1 - level), 50 * (1 + level)])
    return {"ratio": float(np.median(top) / np.median(bottom)), "low": float(low), "high": float(high), "level": level}


def spread(values: list[float] | np.ndarray) -> float:
    """p90 / p50 of a series: 1 on a quiet machine, above `NOISY_SPREAD` on one too busy to trust."""
    array = np.asarray(values, dtype=np.float64)
    return float(np.percentile(array, 90) / np.percentile(array, 50))


def noise_warning(series: dict[str, list[float]]) -> str | None:
    """A warning naming the noisiest series when one's spread is above `NOISY_SPREAD`, else None."""
    spreads = {name: spread(values) for name, values in series.items() if len(values)}
    name = max(spreads, key=spreads.get) if spreads else None
    if name is None or spreads[name] <= NOISY_SPREAD:
        return None
    return (f"the machine was too noisy to trust these ratios: p90/p50 of '{name}' is {spreads[name]:.2f} (above {NOISY_SPREAD}). "
            "Rerun on an idle machine or with more --iters.")


def hardware_card(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What the numbers were measured on."""
    card: dict[str, Any] = {
        "device": str(device),
        "dtype": dtype_name(dtype),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if device.type == "cuda":
        card["gpu"] = torch.cuda.get_device_name(device)
        card["cuda"] = torch.version.cuda
    return card
