"""Compile the draft and the RFSQ decoder graphs to ONNX, TorchScript, torch-tensorrt and AOTInductor (`.pt2`) files.

The draft graph maps exit hidden `[B, hidden]` to `(logits, tokens)` (the runtime's
`DraftGraph`), a decoder graph maps int64 tokens `[B, H, d, c]` to actions `[B, H, A]` for c = C and c = L.
Graphs are traced at batch `TRACE_BATCH` with a dynamic batch dimension; `rsd.export.parity` then checks the
files at other batch sizes. `EXPORTERS` maps each format to the function that writes its file(s).

Usage:
    for graph in graphs(draft_head, tokenizer, "fp32", torch.device("cpu")):
        files, info = EXPORTERS["onnx"](graph, Path(f"bundle/{graph.name}.onnx"), None, torch.device("cpu"))
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsd.bundle import ENGINE_FORMATS
from rsd.device import dtype_name, resolve_dtype
from rsd.models.draft import DraftHead
from rsd.runtime.compiled import compile_aoti
from rsd.runtime.engines import DraftGraph, require_tensorrt
from rsd.tokenizer import ActionTokenizer

log = logging.getLogger(__name__)

FORMATS = ENGINE_FORMATS  # the formats a bundle can hold (rsd.bundle's schema)
SUFFIX = {"onnx": ".onnx", "torchscript": ".ts", "tensorrt": ".trt.ep", "aotinductor": ".pt2"}
TRACE_BATCH = 2  # batch size the graphs are traced at; parity runs at 1, 5 and all rows, never at this size
MAX_BATCH = 1024  # upper bound of the dynamic batch dimension (ONNX dynamo export)
TRT_BATCH = (1, 1, 64)  # TensorRT optimisation profile: min, opt, max batch
DECODER_NOTE = "decoders stay fp32 whatever the draft precision: the RFSQ decode is tiny and fp32 avoids clamping drift"


@dataclass
class Graph:
    """One graph to export: the module, an example input at TRACE_BATCH and its I/O names."""

    name: str  # "draft", "decoder_c3", ...
    module: nn.Module  # DraftGraph or TokenDecoder, eval mode, on the export device
    example: torch.Tensor  # input at batch TRACE_BATCH
    input_name: str  # "exit_hidden" or "tokens"
    output_names: tuple[str, ...]  # graph outputs
    precision: str  # "fp32" or "fp16"
    io: dict[str, Any]  # shapes of the input and outputs for the manifest ("B" is the dynamic batch)


def graphs(head: DraftHead, tok: ActionTokenizer, precision: str, device: torch.device) -> list[Graph]:
    """The draft graph (in `precision`) and the fp32 decoder graphs for c = C and c = L."""
    cfg, dtype = tok.config, resolve_dtype(precision)
    precision_name = dtype_name(dtype)
    draft_io = {
        "inputs": {"exit_hidden": {"shape": ["B", head.config.hidden_size], "dtype": precision_name}},
        "outputs": {"logits": {"shape": ["B", cfg.coarse_layers, cfg.tokens_per_layer, cfg.levels], "dtype": precision_name},
                    "tokens": {"shape": ["B", cfg.coarse_layers, cfg.tokens_per_layer], "dtype": "int64"}},
    }
    result = [Graph("draft", DraftGraph(copy_draft(head, device, dtype)).eval(),
                    torch.randn(TRACE_BATCH, head.config.hidden_size, device=device, dtype=dtype), "exit_hidden",
                    ("logits", "tokens"), precision, draft_io)]
    for c in (cfg.coarse_layers, cfg.num_layers):
        decoder_io = {"inputs": {"tokens": {"shape": ["B", cfg.chunk_len, cfg.latent_dim, c], "dtype": "int64"}},
                      "outputs": {"actions": {"shape": ["B", cfg.chunk_len, cfg.action_dim], "dtype": "float32"}},
                      "note": DECODER_NOTE}
        example = torch.randint(0, cfg.levels, (TRACE_BATCH, cfg.chunk_len, cfg.latent_dim, c), device=device)
        result.append(Graph(f"decoder_c{c}", tok.decoder_module().to(device).eval(), example, "tokens", ("actions",), "fp32", decoder_io))
    return result


def copy_draft(head: DraftHead, device: torch.device, dtype: torch.dtype) -> DraftHead:
    """A copy of the draft on `device` in `dtype` (the loaded one stays fp32 for the references)."""
    copy = DraftHead(head.config)
    copy.load_state_dict(head.state_dict())
    return copy.to(device, dtype).eval()


def export_onnx(graph: Graph, path: Path, opset: int | None, device: torch.device) -> tuple[list[Path], dict[str, Any]]:
    """`torch.onnx.export` with the dynamo exporter (legacy only if dynamo fails, logged), then `onnx.checker`."""
    import onnx
    import onnxruntime

    names = {"input_names": [graph.input_name], "output_names": list(graph.output_names), "opset_version": opset}
    info: dict[str, Any] = {"exporter": "dynamo"}
    try:
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        torch.onnx.export(graph.module, (graph.example,), str(path), dynamo=True, dynamic_shapes=({0: batch},),
                          external_data=False, verbose=False, **names)
    except Exception as error:  # the dynamo exporter raises many error types; the fallback is logged and recorded
        log.warning("export-draft: the dynamo ONNX exporter failed on %s (%s: %s); using the legacy exporter",
                    graph.name, type(error).__name__, error)
        for stale in path.parent.glob(f"{path.name}*"):
            stale.unlink()
        info = {"exporter": "legacy", "dynamo_error": f"{type(error).__name__}: {str(error)[:500]}"}
        axes = {name: {0: "batch"} for name in (graph.input_name, *graph.output_names)}
        torch.onnx.export(graph.module, (graph.example,), str(path), dynamo=False, dynamic_axes=axes, **names)
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    info["opset"] = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    info["versions"] = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    external = sorted(p for p in path.parent.glob(f"{path.name}.*") if p.is_file())  # e.g. draft.onnx.data
    return [path, *external], info


def export_torchscript(graph: Graph, path: Path, opset: int | None, device: torch.device) -> tuple[list[Path], dict[str, Any]]:
    """`torch.jit.trace` at TRACE_BATCH and save `.ts` (parity at other batch sizes checks the trace is batch-generic)."""
    with warnings.catch_warnings():
        # the draft's input-shape check becomes a constant in the trace; parity at batches 1, 5 and N covers it
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(graph.module, (graph.example,), check_trace=False)
    traced.save(str(path))
    return [path], {"exporter": "torch.jit.trace"}


def export_tensorrt(graph: Graph, path: Path, opset: int | None, device: torch.device) -> tuple[list[Path], dict[str, Any]]:
    """torch-tensorrt (ir="dynamo") with a dynamic batch profile, saved as an exported program `*.trt.ep` (CUDA only)."""
    require_tensorrt(device)
    import torch_tensorrt

    shape = tuple(graph.example.shape[1:])
    low, opt, high = TRT_BATCH
    inputs = [torch_tensorrt.Input(min_shape=(low, *shape), opt_shape=(opt, *shape), max_shape=(high, *shape),
                                   dtype=graph.example.dtype, name=graph.input_name)]
    precisions = {resolve_dtype(graph.precision)}
    compiled = torch_tensorrt.compile(graph.module, ir="dynamo", inputs=inputs, enabled_precisions=precisions, min_block_size=1)
    torch_tensorrt.save(compiled, str(path), output_format="exported_program", arg_inputs=inputs, retrace=True)
    return [path], {"exporter": "torch_tensorrt.compile(ir=dynamo)", "versions": {"torch_tensorrt": torch_tensorrt.__version__}}


def export_aotinductor(graph: Graph, path: Path, opset: int | None, device: torch.device) -> tuple[list[Path], dict[str, Any]]:
    """`torch.export` with a dynamic batch, compiled and packaged by AOTInductor as `.pt2` for `device` (no Python model code to run it)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    compile_aoti(graph.module, (graph.example,), path, dynamic_shapes=({0: batch},))
    return [path], {"exporter": "torch.export + AOTInductor", "aotinductor": {"device": device.type}}


EXPORTERS: dict[str, Callable[[Graph, Path, int | None, torch.device], tuple[list[Path], dict[str, Any]]]] = {
    "onnx": export_onnx,
    "torchscript": export_torchscript,
    "tensorrt": export_tensorrt,
    "aotinductor": export_aotinductor,
}
