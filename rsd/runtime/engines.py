"""Engines: the draft and the action decoder behind one interface, whatever format runs them.

A draft engine maps exit hidden states `[B, hidden]` to `(logits [B, C, H*d, V], tokens [B, C, H*d] int64)` (the
gate's confidences come from the logits, `rsd.runtime.gate.Gate.confidences`); a decoder engine maps int64 tokens `[B, H, d, c]` to
float32 un-normalised actions `[B, H, A]`, all as torch tensors on the device. Every format lives here: PyTorch
eager (`torch`, the reference), ONNX Runtime (`onnx`), TorchScript (`torchscript`, deprecated by torch 2.14 but
still read), torch-tensorrt (`tensorrt`) and AOTInductor packages (`aotinductor`, `.pt2`); a new format adds its two classes and its entries in `DRAFT_ENGINES` / `DECODER_ENGINES`. The
bundle loader (`rsd.runtime.bundle`) builds them from a bundle's files, and export (`rsd.export`) loads what it
compiled through the same classes to check parity. Engines know nothing about observations, images or robots.

Usage:
    draft = TorchDraftEngine(draft_head)
    logits, tokens = draft(exit_hidden)
    decoder = DECODER_ENGINES["onnx"]("runs/demo/bundle/decoder_c3.onnx", torch.device("cpu"), 3)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from rsd.device import cuda_usable
from rsd.errors import EngineError, ShapeError
from rsd.models.draft import DraftHead

ENGINE_PREFERENCE = ("tensorrt", "aotinductor", "onnx", "torchscript", "torch")


class DraftEngine(Protocol):
    """Runs the draft: exit hidden `[B, hidden]` → logits, tokens."""

    name: str

    def __call__(self, exit_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft outputs for a batch of exit hidden states."""
        ...


class DecoderEngine(Protocol):
    """Runs the action decoder: tokens `[B, H, d, c]` → un-normalised actions `[B, H, A]`."""

    name: str

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Actions for a batch of token tensors."""
        ...


class DraftGraph(nn.Module):
    """The exported draft graph: exit hidden `[B, hidden]` → (logits, tokens).

    Bundles exported before 2026-11-26 also output the mean/min max-softmax confidences; the engines read the first
    two outputs, so those bundles still load.
    """

    def __init__(self, draft: DraftHead) -> None:
        super().__init__()
        self.draft = draft

    def forward(self, exit_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits `[B, C, H*d, V]` and their argmax tokens `[B, C, H*d]` (`DraftHead.forward` as a tuple of tensors)."""
        out = self.draft(exit_hidden)
        return out.logits, out.tokens


class TorchDraftEngine:
    """The draft in PyTorch eager mode (always available; the reference for parity)."""

    name = "torch"

    def __init__(self, draft: DraftHead) -> None:
        self.graph = DraftGraph(draft).eval()
        self.dtype = next(draft.parameters()).dtype

    @torch.inference_mode()
    def __call__(self, exit_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and tokens for `exit_hidden [B, hidden]` (cast to the draft's dtype)."""
        return self.graph(exit_hidden.to(self.dtype))


class TorchDecoderEngine:
    """The action decoder in PyTorch eager mode."""

    name = "torch"

    def __init__(self, decoder: nn.Module, num_layers: int) -> None:
        self.decoder = decoder.eval()
        self.num_layers = num_layers

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Actions `[B, H, A]` for tokens `[B, H, d, c]`."""
        check_decoder_tokens(tokens, self.num_layers)
        return self.decoder(tokens)


def check_decoder_tokens(tokens: torch.Tensor, num_layers: int) -> None:
    """Refuse tokens that are not int64 `[B, H, d, c]` with c == `num_layers`."""
    if tokens.ndim != 4 or tokens.shape[-1] != num_layers or tokens.dtype != torch.int64:
        raise ShapeError(
            f"decoder engine: expected int64 tokens [B, H, d, {num_layers}], got {tokens.dtype} {tuple(tokens.shape)}."
        )


def onnx_providers(device: torch.device) -> list[str]:
    """ONNX Runtime execution providers for `device`; CUDA needs the CUDA (or TensorRT) provider, else EngineError."""
    import onnxruntime as ort

    present = ort.get_available_providers()
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in present]
    if device.type != "cuda" or not gpu:
        raise EngineError(f"onnx on {device}: expected onnxruntime with the CUDA or TensorRT provider, got providers {present}. "
                          "Install onnxruntime-gpu or use the torchscript/torch engine.")
    return [*gpu, "CPUExecutionProvider"]


class OnnxSession:
    """One ONNX Runtime session on the providers for a device (numpy in, torch tensors on the device out).

    The session runs single-threaded with spinning off: the draft and decoder graphs are far too small to gain
    from a thread pool, and ORT's spinning workers otherwise keep the cores busy after each call and slow the main
    model's torch ops that follow (measured on 2 cores: 50 ms per speculative chunk instead of 4 ms).
    """

    def __init__(self, path: str | Path, device: torch.device) -> None:
        import onnxruntime as ort

        self.device = device
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=onnx_providers(device))
        self.input_name = self.session.get_inputs()[0].name

    def run(self, array: np.ndarray, outputs: Sequence[str] | None = None) -> list[torch.Tensor]:
        """The graph's outputs named `outputs` (None: all) for one input array, as tensors on the device."""
        names = None if outputs is None else list(outputs)
        return [torch.from_numpy(np.asarray(out)).to(self.device) for out in self.session.run(names, {self.input_name: np.ascontiguousarray(array)})]


class OnnxDraftEngine:
    """The draft graph run by ONNX Runtime; inputs are cast to the engine's precision."""

    name = "onnx"

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.session = OnnxSession(path, device)
        self.dtype = dtype

    def __call__(self, exit_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits `[B, C, H*d, V]` and tokens `[B, C, H*d]` for `[B, hidden]`."""
        logits, tokens = self.session.run(exit_hidden.detach().to("cpu", self.dtype).numpy(), ("logits", "tokens"))
        return logits, tokens


class OnnxDecoderEngine:
    """The decoder graph for c layers run by ONNX Runtime (fp32)."""

    name = "onnx"

    def __init__(self, path: str | Path, device: torch.device, num_layers: int) -> None:
        self.session = OnnxSession(path, device)
        self.num_layers = num_layers

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Actions `[B, H, A]` for int64 tokens `[B, H, d, c]`."""
        check_decoder_tokens(tokens, self.num_layers)
        return self.session.run(tokens.detach().cpu().numpy())[0]


class ModuleDraftEngine:
    """A compiled draft graph held as a torch module (TorchScript, torch-tensorrt); outputs cast to the engine types."""

    name = "module"

    def __init__(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.module = module
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def __call__(self, exit_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and tokens (int64) for exit hidden `[B, hidden]`."""
        # contiguous: an AOTInductor package assumes the strides of the example it was exported with and does not check them
        logits, tokens = self.module(exit_hidden.to(self.device, self.dtype).contiguous())[:2]  # older bundles add two confidences
        return logits, tokens.to(torch.int64)


class ModuleDecoderEngine:
    """A compiled decoder graph for c layers held as a torch module (TorchScript, torch-tensorrt)."""

    name = "module"

    def __init__(self, module: torch.nn.Module, device: torch.device, num_layers: int) -> None:
        self.module = module
        self.device, self.num_layers = device, num_layers

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Actions `[B, H, A]` (float32) for int64 tokens `[B, H, d, c]`."""
        check_decoder_tokens(tokens, self.num_layers)
        return self.module(tokens.to(self.device).contiguous()).float()  # contiguous: see ModuleDraftEngine


class TorchScriptDraftEngine(ModuleDraftEngine):
    """The traced draft graph (`.ts`) loaded with `torch.jit.load`."""

    name = "torchscript"

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(torch.jit.load(str(path), map_location=device).eval(), device, dtype)


class TorchScriptDecoderEngine(ModuleDecoderEngine):
    """The traced decoder graph for c layers (`.ts`)."""

    name = "torchscript"

    def __init__(self, path: str | Path, device: torch.device, num_layers: int) -> None:
        super().__init__(torch.jit.load(str(path), map_location=device).eval(), device, num_layers)


def load_tensorrt(path: str | Path, device: torch.device) -> torch.nn.Module:
    """Load a `*.trt.ep` exported program saved by `torch_tensorrt.save` (CUDA only)."""
    require_tensorrt(device)
    import torch_tensorrt

    return torch_tensorrt.load(str(path)).module().to(device)


class TensorRTDraftEngine(ModuleDraftEngine):
    """The draft compiled by torch-tensorrt (CUDA only)."""

    name = "tensorrt"

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(load_tensorrt(path, device), device, dtype)


class TensorRTDecoderEngine(ModuleDecoderEngine):
    """The decoder for c layers compiled by torch-tensorrt (CUDA only)."""

    name = "tensorrt"

    def __init__(self, path: str | Path, device: torch.device, num_layers: int) -> None:
        super().__init__(load_tensorrt(path, device), device, num_layers)


def load_aoti(path: str | Path, device: torch.device) -> Any:
    """Load an AOTInductor `.pt2` package (compiled code and weights, no Python model code) to run on `device`."""
    return torch._inductor.aoti_load_package(str(path), device_index=-1 if device.index is None else device.index)


class AOTIDraftEngine(ModuleDraftEngine):
    """The draft exported with `torch.export` and compiled by AOTInductor (`.pt2`, for the device it was built on)."""

    name = "aotinductor"

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(load_aoti(path, device), device, dtype)


class AOTIDecoderEngine(ModuleDecoderEngine):
    """The decoder for c layers exported and compiled by AOTInductor (`.pt2`)."""

    name = "aotinductor"

    def __init__(self, path: str | Path, device: torch.device, num_layers: int) -> None:
        super().__init__(load_aoti(path, device), device, num_layers)


DRAFT_ENGINES = {"onnx": OnnxDraftEngine, "torchscript": TorchScriptDraftEngine, "tensorrt": TensorRTDraftEngine,
                 "aotinductor": AOTIDraftEngine}
DECODER_ENGINES = {"onnx": OnnxDecoderEngine, "torchscript": TorchScriptDecoderEngine, "tensorrt": TensorRTDecoderEngine,
                   "aotinductor": AOTIDecoderEngine}


def tensorrt_missing(device: torch.device) -> str | None:
    """Why torch-tensorrt cannot run on `device` here, or None when it can."""
    if not cuda_usable(device):
        return f"TensorRT needs a CUDA device, got {device} (torch.cuda.is_available() is {torch.cuda.is_available()})"
    if importlib.util.find_spec("torch_tensorrt") is None:
        return "TensorRT needs the torch_tensorrt package, which is not installed (pip install .[gpu])"
    return None


def require_tensorrt(device: torch.device) -> None:
    """Raise EngineError saying what is missing when torch-tensorrt cannot run on `device`."""
    missing = tensorrt_missing(device)
    if missing:
        raise EngineError(f"tensorrt: {missing}. Build and run TensorRT engines on a CUDA machine with torch-tensorrt, "
                          "or pass --dry-run to write the planned manifest entries without building.")


def runtime_available(fmt: str, device: torch.device) -> bool:
    """Whether engines of format `fmt` can run on `device` on this machine."""
    if fmt == "tensorrt":
        return tensorrt_missing(device) is None
    if fmt == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            return False
        try:
            onnx_providers(device)
        except EngineError:
            return False
        return True
    return fmt in ("aotinductor", "torchscript", "torch")
