"""Stage timers for the runtime and the benchmarks: CUDA-synchronised wall time in milliseconds.

Usage:
    timer = StageTimer(device)
    with timer("prefix"):
        state = model.prefix(inputs, k)
    timer.timings            # {"prefix": 3.1}
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work on `device` so wall-clock time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Measures named stages of one call; every stage is synchronised before and after on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Time the enclosed block as `stage` (adding to it if it was timed before in this call)."""
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.timings[stage] = self.timings.get(stage, 0.0) + (time.perf_counter() - start) * 1e3


def summarize(values: list[float] | np.ndarray) -> dict[str, float]:
    """mean, p50, p90, p99 and max of a list of milliseconds."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {"n": 0}
    return {
        "n": int(array.size),
        "mean": float(array.mean()),
        "p50": float(np.percentile(array, 50)),
        "p90": float(np.percentile(array, 90)),
        "p99": float(np.percentile(array, 99)),
        "max": float(array.max()),
    }


class RollingStats:
    """Bounded per-stage history (last `window` values) so a long control loop keeps constant memory."""

    def __init__(self, window: int = 2000) -> None:
        self.window = window
        self.values: dict[str, deque[float]] = {}

    def add(self, timings: dict[str, float]) -> None:
        """Record one call's stage timings."""
        for stage, value in timings.items():
            self.values.setdefault(stage, deque(maxlen=self.window)).append(value)

    def summary(self) -> dict[str, dict[str, float]]:
        """`summarize` of every stage over the window."""
        return {stage: summarize(list(values)) for stage, values in self.values.items()}
