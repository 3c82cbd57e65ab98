"""Device and dtype resolution, decided once with the reason logged: CUDA or the CPU, fp32, fp16 or bf16.

Every part of rsd that takes a device or a dtype by name resolves it here, so "is CUDA usable?" and
"which torch dtype is fp16?" have one answer.

Usage:
    device, dtype = resolve_device_dtype(None, None)   # CUDA + fp16 where CUDA works, else CPU + fp32
    device = check_device("cuda")                      # DeviceError where torch.cuda.is_available() is false
"""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
from pathlib import Path

import torch

from rsd.errors import ConfigError, DeviceError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def cuda_usable(device: torch.device) -> bool:
    """Whether `device` is a CUDA device that this machine can run on."""
    return device.type == "cuda" and torch.cuda.is_available()


def cpu_compiler() -> str | None:
    """The C++ compiler torch.compile's inductor builds CPU kernels with ($CXX, else g++), or None where there is none
    or Python's headers (Python.h), which those kernels include, are missing."""
    if not (Path(sysconfig.get_path("include")) / "Python.h").exists():
        return None
    return shutil.which(os.environ.get("CXX", "g++"))


def check_device(device: str | torch.device, fix: str = "") -> torch.device:
    """The torch device `device`; a CUDA device where CUDA is not usable is a DeviceError (`fix` says what to do)."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and not cuda_usable(resolved):
        raise DeviceError(f"device: expected a usable device, got {str(device)!r} but torch.cuda.is_available() is false."
                          + (f" {fix}" if fix else ""))
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype named `dtype` (fp32/float32, fp16/float16, bf16/bfloat16), or `dtype` itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}.")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a torch dtype, e.g. "float16" (what manifests and reports print)."""
    return str(dtype).removeprefix("torch.")


def resolve_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """Resolve the device (CUDA when present) and dtype (fp32 on the CPU, fp16 on CUDA) once, logging why."""
    if device is None:
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        reason = "default: CUDA is available" if resolved.type == "cuda" else "default: no CUDA on this machine"
    else:
        resolved, reason = check_device(device), "as requested"
    if dtype is None:
        torch_dtype = torch.float16 if resolved.type == "cuda" else torch.float32
        dtype_reason = "default for " + resolved.type
    else:
        torch_dtype, dtype_reason = resolve_dtype(dtype), "as requested"
    if resolved.type == "cpu" and torch_dtype == torch.float16:
        log.warning("fp16 on the CPU is slow and less exact; fp32 is the CPU default")
    log.info("device %s (%s), dtype %s (%s)", resolved, reason, dtype_name(torch_dtype), dtype_reason)
    return resolved, torch_dtype
