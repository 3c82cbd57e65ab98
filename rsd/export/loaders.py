"""Build the runtime's draft and decoder engines from a bundle, after checking it belongs to the main model.

`load_bundle_engines` verifies every file hash, then refuses a bundle made for another main model
(fingerprint, hidden width, layer count, tokenizer shape — each message names both values) before anything
runs. The engines share the call signatures of `rsd.runtime.engines`: a draft maps exit hidden `[B, hidden]`
to `(logits [B, C, H*d, V], tokens [B, C, H*d] int64, confidence [B] float32, confidence_min [B] float32)` and a
decoder maps int64 tokens `[B, H, d, c]` to float32 actions `[B, H, A]`, all as torch tensors on the device.
The "torch" engine rebuilds the trained draft from `draft.safetensors` (never from random weights) and the
decoder from the bundle's tokenizer copy, so it is always available.

Usage:
    loaded = load_bundle_engines("runs/demo/bundle", main, engine="auto")
    logits, tokens, conf, conf_min = loaded.draft(exit_hidden)
    actions = loaded.decoders[3](tokens_c3)
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd.config import to_dict
from rsd.errors import CheckpointError, EngineError
from rsd.export.bundle import read_manifest, verify_bundle
from rsd.models.draft import DraftHead
from rsd.models.policy import MainModel
from rsd.runtime.engines import (
    ENGINE_PREFERENCE,
    DecoderEngine,
    DraftEngine,
    TorchDecoderEngine,
    TorchDraftEngine,
    check_decoder_tokens,
)
from rsd.tokenizer import ActionTokenizer

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
TOKENIZER_DIR = "tokenizer"


@dataclass
class LoadedBundle:
    """A bundle's engines, ready for `SpeculativeEngine`, with the gate settings it was exported with."""

    draft: DraftEngine  # exit hidden [B, hidden] -> logits, tokens, confidence, confidence_min
    decoders: dict[int, DecoderEngine]  # c -> tokens [B, H, d, c] -> actions [B, H, A], for c = C and c = L
    exit_layer: int  # the main model's layer the draft reads
    tau: float  # calibrated gate threshold (inf when the bundle is not calibrated)
    gate_statistic: str  # "mean" or "min" confidence
    manifest: dict[str, Any]  # the verified manifest
    engine: str  # the engine format in use


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


class _OnnxSession:
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

    def run(self, array: np.ndarray) -> list[torch.Tensor]:
        """Outputs of the graph for one input array, as tensors on the device."""
        return [torch.from_numpy(np.asarray(out)).to(self.device) for out in self.session.run(None, {self.input_name: np.ascontiguousarray(array)})]


class OnnxDraftEngine:
    """The draft graph run by ONNX Runtime; inputs are cast to the engine's precision."""

    name = "onnx"

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.session = _OnnxSession(path, device)
        self.dtype = dtype

    def __call__(self, exit_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits `[B, C, H*d, V]`, tokens `[B, C, H*d]`, confidence `[B]`, confidence_min `[B]` for `[B, hidden]`."""
        logits, tokens, confidence, confidence_min = self.session.run(exit_hidden.detach().to("cpu", self.dtype).numpy())
        return logits, tokens, confidence, confidence_min


class OnnxDecoderEngine:
    """The decoder graph for c layers run by ONNX Runtime (fp32)."""

    name = "onnx"

    def __init__(self, path: str | Path, device: torch.device, num_layers: int) -> None:
        self.session = _OnnxSession(path, device)
        self.num_layers = num_layers

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Actions `[B, H, A]` for int64 tokens `[B, H, d, c]`."""
        check_decoder_tokens(tokens, self.num_layers)
        return self.session.run(tokens.detach().cpu().numpy())[0]


class TorchScriptDraftEngine:
    """The traced draft graph (`.ts`) loaded with `torch.jit.load`."""

    name = "torchscript"

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.module = torch.jit.load(str(path), map_location=device).eval()
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def __call__(self, exit_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, tokens, confidence, confidence_min for exit hidden `[B, hidden]`."""
        logits, tokens, confidence, confidence_min = self.module(exit_hidden.to(self.device, self.dtype))
        return logits, tokens, confidence, confidence_min


class TorchScriptDecoderEngine:
    """The traced decoder graph for c layers (`.ts`)."""

    name = "torchscript"

    def __init__(self, path: str | Path, device: torch.device, num_layers: int) -> None:
        self.module = torch.jit.load(str(path), map_location=device).eval()
        self.device, self.num_layers = device, num_layers

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Actions `[B, H, A]` for int64 tokens `[B, H, d, c]`."""
        check_decoder_tokens(tokens, self.num_layers)
        return self.module(tokens.to(self.device))


def _load_tensorrt(path: str | Path, device: torch.device) -> torch.nn.Module:
    """Load a `*.trt.ep` exported program saved by `torch_tensorrt.save` (CUDA only)."""
    require_tensorrt(device)
    import torch_tensorrt

    return torch_tensorrt.load(str(path)).module().to(device)


class TensorRTDraftEngine:
    """The draft compiled by torch-tensorrt (CUDA only)."""

    name = "tensorrt"

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.module = _load_tensorrt(path, device)
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def __call__(self, exit_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, tokens, confidence, confidence_min for exit hidden `[B, hidden]`."""
        logits, tokens, confidence, confidence_min = self.module(exit_hidden.to(self.device, self.dtype))
        return logits, tokens.to(torch.int64), confidence.float(), confidence_min.float()


class TensorRTDecoderEngine:
    """The decoder for c layers compiled by torch-tensorrt (CUDA only)."""

    name = "tensorrt"

    def __init__(self, path: str | Path, device: torch.device, num_layers: int) -> None:
        self.module = _load_tensorrt(path, device)
        self.device, self.num_layers = device, num_layers

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Actions `[B, H, A]` for int64 tokens `[B, H, d, c]`."""
        check_decoder_tokens(tokens, self.num_layers)
        return self.module(tokens.to(self.device)).float()


DRAFT_ENGINES = {"onnx": OnnxDraftEngine, "torchscript": TorchScriptDraftEngine, "tensorrt": TensorRTDraftEngine}
DECODER_ENGINES = {"onnx": OnnxDecoderEngine, "torchscript": TorchScriptDecoderEngine, "tensorrt": TensorRTDecoderEngine}


def tensorrt_missing(device: torch.device) -> str | None:
    """Why torch-tensorrt cannot run on `device` here, or None when it can."""
    if device.type != "cuda" or not torch.cuda.is_available():
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
    return fmt in ("torchscript", "torch")


def graph_names(manifest: dict[str, Any]) -> list[str]:
    """The graphs every engine format needs: the draft and the decoders for c = C and c = L."""
    shapes = manifest["shapes"]
    return ["draft", f"decoder_c{shapes['coarse_layers']}", f"decoder_c{shapes['num_layers']}"]


def _built(manifest: dict[str, Any], fmt: str) -> dict[str, dict[str, Any]] | None:
    """The built entries of `fmt` by graph name, or None unless all three graphs are built."""
    entries = {e["name"]: e for e in manifest["engines"] if e["format"] == fmt and e["built"]}
    return entries if all(name in entries for name in graph_names(manifest)) else None


def available_engines(bundle: str | Path, device: torch.device | str) -> list[str]:
    """Engine formats built in the bundle that run on `device`, in ENGINE_PREFERENCE order ("torch" always)."""
    manifest = read_manifest(bundle)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device}: expected CUDA, but torch.cuda.is_available() is false. Load the bundle on the CPU.")
    return [fmt for fmt in ENGINE_PREFERENCE if (fmt == "torch" or _built(manifest, fmt)) and runtime_available(fmt, device)]


def check_main(manifest: dict[str, Any], main: MainModel, bundle: str | Path) -> None:
    """Refuse a bundle made for another main model: fingerprint, hidden size, layer count, tokenizer shape."""
    shapes = manifest["shapes"]
    if manifest["main_fingerprint"] != main.fingerprint:
        raise CheckpointError(f"{bundle}: the bundle was exported for main model fingerprint {manifest['main_fingerprint']!r}, "
                              f"but the main model has {main.fingerprint!r}. Export a bundle from the draft trained for this model.")
    if shapes["hidden_size"] != main.hidden_size:
        raise CheckpointError(f"{bundle}: the draft reads hidden size {shapes['hidden_size']}, the main model has {main.hidden_size}.")
    if not 0 <= manifest["exit_layer"] <= main.num_layers:
        raise CheckpointError(f"{bundle}: exit layer {manifest['exit_layer']} needs a main model with at least that many layers, "
                              f"the main model has {main.num_layers}.")
    ours = to_dict(main.tokenizer.config)
    if shapes["tokenizer"] != ours:
        raise CheckpointError(f"{bundle}: the bundle's tokenizer config is {shapes['tokenizer']}, the main model's is {ours}; "
                              "the token shapes must match.")


def load_bundle_engines(bundle: str | Path, main: MainModel, engine: str = "auto", device: torch.device | str | None = None) -> LoadedBundle:
    """Verify the bundle, check it against `main`, and build the draft and decoder engines of `engine` on `device`."""
    bundle = Path(bundle)
    manifest = verify_bundle(bundle)
    check_main(manifest, main, bundle)
    device = next(main.vla.parameters()).device if device is None else torch.device(device)
    available = available_engines(bundle, device)
    if engine == "auto":
        name = available[0]
        log.info("bundle %s: engine auto -> %s on %s (available here: %s)", bundle, name, device, ", ".join(available))
    elif engine in available:
        name = engine
    else:
        raise EngineError(f"engine {engine!r}: expected one of {available} (built in {bundle} and runnable on {device}), got {engine!r}.")
    dtype = DTYPES[manifest["precision"]]
    shapes = manifest["shapes"]
    layers = (shapes["coarse_layers"], shapes["num_layers"])
    if name == "torch":
        draft_head, _ = DraftHead.load(bundle, expect_hidden=main.hidden_size, expect_exit_layer=manifest["exit_layer"],
                                       expect_fingerprint=main.fingerprint)
        tokenizer = ActionTokenizer.load(bundle / TOKENIZER_DIR).to(device)
        draft: DraftEngine = TorchDraftEngine(draft_head.to(device, dtype))
        decoders: dict[int, DecoderEngine] = {c: TorchDecoderEngine(tokenizer.decoder_module(), c) for c in layers}
    else:
        entries = _built(manifest, name)
        assert entries is not None, "available_engines lists only formats with every graph built"
        draft = DRAFT_ENGINES[name](bundle / entries["draft"]["files"][0]["path"], device, DTYPES[entries["draft"]["precision"]])
        decoders = {c: DECODER_ENGINES[name](bundle / entries[f"decoder_c{c}"]["files"][0]["path"], device, c) for c in layers}
    return LoadedBundle(draft=draft, decoders=decoders, exit_layer=int(manifest["exit_layer"]), tau=float(manifest["tau"]),
                        gate_statistic=manifest["gate_statistic"], manifest=manifest, engine=name)
