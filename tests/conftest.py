"""Shared fixtures and the skips for GPU, TensorRT and simulator tests."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests without CUDA and `tensorrt` tests without torch-tensorrt, saying why."""
    has_cuda = torch.cuda.is_available()
    has_trt = has_cuda and importlib.util.find_spec("torch_tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is false on this machine"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs CUDA and torch-tensorrt (pip install .[gpu]); not present here"))
