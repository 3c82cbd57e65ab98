"""Benchmark timing: milliseconds of repeated calls (CUDA events on the GPU, wall time on the CPU) and the hardware card.

Usage:
    times = time_calls(lambda: model(inputs), iters=50, warmup=10, device=torch.device("cpu"))   # list of ms
    card = hardware_card(torch.device("cpu"), torch.float32)
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from rsd.device import dtype_name


def time_calls(fn: Callable[[], Any], iters: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of `iters` calls of `fn` after `warmup` untimed calls (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return times


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
