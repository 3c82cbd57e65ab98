"""Device and dtype resolution: defaults, names, and the one CUDA check every caller shares."""

from __future__ import annotations

import pytest
import torch

from rsd.device import check_device, dtype_name, resolve_device_dtype, resolve_dtype
from rsd.errors import ConfigError, DeviceError, EngineError


def test_resolve_device_dtype() -> None:
    assert resolve_device_dtype("cpu", None) == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "bf16")[1] == torch.bfloat16
    assert resolve_device_dtype("cpu", torch.float16)[1] == torch.float16
    with pytest.raises(ConfigError, match="dtype"):
        resolve_device_dtype("cpu", "fp8")


def test_dtype_names_round_trip() -> None:
    for name in ("fp32", "fp16", "bf16"):
        assert resolve_dtype(resolve_dtype(name)) == resolve_dtype(name)
    assert dtype_name(resolve_dtype("fp16")) == "float16" and resolve_dtype("float16") == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_without_cuda_is_one_error_for_every_caller() -> None:
    for call in (lambda: check_device("cuda"), lambda: resolve_device_dtype("cuda", None)):
        with pytest.raises(DeviceError, match="torch.cuda.is_available") as info:
            call()
        assert isinstance(info.value, ConfigError) and isinstance(info.value, EngineError)
    with pytest.raises(DeviceError, match="Load the bundle on the CPU"):
        check_device(torch.device("cuda"), fix="Load the bundle on the CPU.")
    assert check_device("cpu") == torch.device("cpu")
