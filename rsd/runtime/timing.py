"""Stage timers for the runtime and the benchmarks: milliseconds per named stage of one call.

On the CPU a stage is wall time (`time.perf_counter`). On CUDA a stage is the GPU time between two CUDA events
recorded on the current stream, and nothing is synchronised while the call runs: a synchronisation before and
after every stage would stall the stream five times per chunk and break the pipelining that CUDA graphs rely
on. The events are read when `timings` is first asked for, after the call has synchronised once to hand its
actions to the host.

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
    """Measures named stages of one call: wall time on the CPU, CUDA events (no synchronisation) on the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cpu: dict[str, float] = {}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Time the enclosed block as `stage` (adding to it if it was timed before in this call)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((stage, start, end))
            return
        begin = time.perf_counter()
        yield
        self._cpu[stage] = self._cpu.get(stage, 0.0) + (time.perf_counter() - begin) * 1e3

    @property
    def timings(self) -> dict[str, float]:
        """ms per stage (on CUDA this waits for the last recorded event)."""
        if self._events:
            self._events[-1][2].synchronize()
            for stage, start, end in self._events:
                self._cpu[stage] = self._cpu.get(stage, 0.0) + start.elapsed_time(end)
            self._events.clear()
        return dict(self._cpu)


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
