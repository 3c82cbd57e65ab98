"""export-draft: compile the draft and the RFSQ decoder, check them against PyTorch, and write a bundle.

The runtime should run the draft (exit hidden → coarse logits, tokens, confidences) and the decoders for
c = C and c = L through whatever is fastest on the device — ONNX Runtime, TorchScript or torch-tensorrt — but
a compiled graph is only worth running if it computes what the trained PyTorch module computes. So every
engine is loaded back through the runtime's own engine classes and compared with eager PyTorch on held-out
inputs (logits max |diff|, token agreement — 100 % required in fp32 —, confidences, decoded actions) at batch
sizes other than the traced one (the batch dimension is dynamic). The bundle is assembled in a staging
folder beside `out` and moved into place only after every check passed, so a failed export never leaves a
manifest that marks anything valid.

Precision: `fp16` builds the draft engines from the half-precision draft; the decoders stay fp32 (the RFSQ
decode is tiny, and fp32 keeps the clamp to [-1, 1] and the un-normalisation exact). TensorRT needs CUDA and
torch-tensorrt; `dry_run` writes its planned manifest entries (`"built": false`) without building, while ONNX
and TorchScript are still built and checked.

Usage:
    rsd export-draft --draft runs/demo/draft_k3 --tokenizer runs/demo/tokenizer --features runs/demo/features_k3 \\
        --calibration runs/demo/draft_k3/calibration.json --out runs/demo/bundle --formats onnx,torchscript
    report = export_draft("runs/demo/draft_k3", "runs/demo/tokenizer", "runs/demo/bundle", formats=("onnx",))
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

import rsd
from rsd.config import to_dict
from rsd.errors import CheckpointError, ConfigError, DataError, EngineError, ParityError
from rsd.export.bundle import BUNDLE_KIND, MANIFEST, file_entry
from rsd.export.loaders import DECODER_ENGINES, DRAFT_ENGINES, DTYPES, TOKENIZER_DIR, require_tensorrt
from rsd.io import FORMAT_VERSION, sha256_file
from rsd.models.draft import DRAFT_FILE, DraftHead
from rsd.runtime.engines import DraftGraph, TorchDecoderEngine, TorchDraftEngine
from rsd.tokenizer import ActionTokenizer, layers_to_tokens
from rsd.tokenizer.rfsq import TOKENIZER_FILE

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "tensorrt")
SUFFIX = {"onnx": ".onnx", "torchscript": ".ts", "tensorrt": ".trt.ep"}
TRACE_BATCH = 2  # batch size the graphs are traced at; parity runs at 1, 5 and all rows, never at this size
MAX_BATCH = 1024  # upper bound of the dynamic batch dimension (ONNX dynamo export)
TRT_BATCH = (1, 1, 64)  # TensorRT optimisation profile: min, opt, max batch
PARITY_ROWS = 64  # held-out rows the draft is checked on (and as many token rows again for the decoders)
TOLERANCES = {
    "fp32": {"logits_max_abs": 1e-3, "confidence_max_abs": 1e-4, "min_token_agreement": 1.0},
    "fp16": {"logits_max_abs": 5e-2, "confidence_max_abs": 1e-2, "min_token_agreement": 0.99},
}
ACTION_TOLERANCE = 1e-4  # decoder max |diff|, relative to max(1, max |action|)
DECODER_NOTE = "decoders stay fp32 whatever the draft precision: the RFSQ decode is tiny and fp32 avoids clamping drift"


@dataclass
class _Graph:
    """One graph to export: the module, an example input at TRACE_BATCH and its I/O names."""

    name: str  # "draft", "decoder_c3", ...
    module: nn.Module  # DraftGraph or TokenDecoder, eval mode, on the export device
    example: torch.Tensor  # input at batch TRACE_BATCH
    input_name: str  # "exit_hidden" or "tokens"
    output_names: tuple[str, ...]  # graph outputs
    precision: str  # "fp32" or "fp16"
    io: dict[str, Any]  # shapes of the input and outputs for the manifest ("B" is the dynamic batch)


def export_draft(
    draft: str | Path,
    tokenizer: str | Path,
    out: str | Path,
    formats: Iterable[str] = ("onnx", "torchscript"),
    precision: str = "fp32",
    calibration: str | Path | None = None,
    features: str | Path | None = None,
    dry_run: bool = False,
    opset: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Export the draft and decoders to `formats`, check parity, write the bundle `out`; return the report."""
    start = time.perf_counter()
    formats = _check_formats(formats)
    if precision not in TOLERANCES:
        raise ConfigError(f"precision: expected one of {sorted(TOLERANCES)}, got {precision!r}.")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device: expected a usable {device}, but torch.cuda.is_available() is false. Export with --device cpu.")
    if "tensorrt" in formats and not dry_run:
        require_tensorrt(device)
    out = Path(out)
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        sources = _copy_sources(Path(draft), Path(tokenizer), staging)
        head, meta = DraftHead.load(staging)
        tok = ActionTokenizer.load(staging / TOKENIZER_DIR)
        if to_dict(head.config.tokenizer) != to_dict(tok.config):
            raise CheckpointError(f"{draft}: the draft predicts tokens of config {to_dict(head.config.tokenizer)}, "
                                  f"the tokenizer {tokenizer} has {to_dict(tok.config)}. Export with the tokenizer the draft was trained on.")
        if "main_fingerprint" not in meta:
            raise CheckpointError(f"{draft}/{DRAFT_FILE}.json: expected a main_fingerprint, found none. Re-train with `rsd train-draft`.")
        gate = _read_calibration(calibration, meta["main_fingerprint"], head.config.exit_layer)
        hidden, tokens, parity_inputs = _parity_inputs(head, tok, meta, features, seed)
        graphs = _graphs(head, tok, precision, device)
        references = _references(head, tok, precision, device)
        engines = [_build_engine(fmt, graph, staging, references, hidden, tokens, dry_run, opset, device)
                   for fmt in formats for graph in graphs]
        manifest = _manifest(head, tok, meta, gate, precision, parity_inputs, sources, engines, device)
        (staging / f"{MANIFEST}.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    report = {
        "out": str(out),
        "seconds": time.perf_counter() - start,
        "calibrated": gate["calibrated"],
        "tau": gate["tau"],
        "parity_inputs": parity_inputs,
        "engines": [{k: e.get(k) for k in ("name", "format", "precision", "built", "export_seconds", "exporter", "parity", "reason")}
                    | {"bytes": sum(f["bytes"] for f in e["files"])} for e in engines],
    }
    log.info("export-draft: wrote %s in %.1f s", out, report["seconds"])
    return report


def _check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    """Validate the requested formats (deduplicated, in the given order)."""
    chosen = tuple(dict.fromkeys(f.strip() for f in formats if f.strip()))
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise ConfigError(f"formats: expected a non-empty subset of {list(FORMATS)}, got {list(chosen)}.")
    return chosen


def _check_out(out: Path) -> None:
    """Refuse to replace anything but an empty folder or an earlier bundle."""
    if not out.exists():
        return
    if not out.is_dir() or (any(out.iterdir()) and not (out / f"{MANIFEST}.json").is_file()):
        raise ConfigError(f"--out {out}: expected a new folder, an empty one or an earlier bundle, got an existing "
                          "path without a manifest.json. Choose another --out.")


def _copy_sources(draft: Path, tokenizer: Path, staging: Path) -> list[dict[str, Any]]:
    """Copy the draft and tokenizer artifacts into the staging bundle; return their file entries."""
    copies = [(draft / f"{DRAFT_FILE}{ext}", staging / f"{DRAFT_FILE}{ext}") for ext in (".safetensors", ".json")]
    copies += [(tokenizer / f"{TOKENIZER_FILE}{ext}", staging / TOKENIZER_DIR / f"{TOKENIZER_FILE}{ext}") for ext in (".safetensors", ".json")]
    for source, target in copies:
        if not source.is_file():
            raise CheckpointError(f"{source}: expected this file of a saved artifact, found none. "
                                  "Point --draft at a `rsd train-draft` folder and --tokenizer at a `rsd train-tokenizer` folder.")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return [file_entry(staging, target) for _, target in copies]


def _read_calibration(path: str | Path | None, fingerprint: str, exit_layer: int) -> dict[str, Any]:
    """tau and the gate statistic from a calibration.json made for the same main model and exit layer."""
    if path is None:
        log.warning("export-draft: no --calibration given; tau = inf, so the draft is never accepted until you calibrate.")
        return {"tau": math.inf, "gate_statistic": "mean", "calibrated": False, "calibration": None}
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: expected a calibration.json written by `rsd calibrate`, found no file.")
    data = json.loads(path.read_text())
    if data.get("main_fingerprint") != fingerprint:
        raise CheckpointError(f"{path}: calibrated for main model fingerprint {data.get('main_fingerprint')!r}, "
                              f"but the draft was trained for {fingerprint!r}. Calibrate this draft with `rsd calibrate`.")
    if data.get("exit_layer") != exit_layer:
        raise CheckpointError(f"{path}: calibrated at exit layer {data.get('exit_layer')!r}, but the draft reads exit layer {exit_layer}.")
    if data.get("gate_statistic") not in ("mean", "min"):
        raise CheckpointError(f"{path}: expected gate_statistic 'mean' or 'min', got {data.get('gate_statistic')!r}.")
    return {"tau": float(data["tau"]), "gate_statistic": data["gate_statistic"], "calibrated": True,
            "calibration": {"file": str(path), "sha256": sha256_file(path)}}


def _parity_inputs(head: DraftHead, tok: ActionTokenizer, meta: dict[str, Any], features: str | Path | None,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Exit hidden rows `[N, hidden]` and decoder tokens `[M, H, d, L]` to check parity on, and where they come from."""
    cfg = tok.config
    generator = torch.Generator().manual_seed(seed)
    random_tokens = torch.randint(0, cfg.levels, (PARITY_ROWS, cfg.chunk_len, cfg.latent_dim, cfg.num_layers), generator=generator)
    if features is None:
        hidden = torch.randn(PARITY_ROWS, head.config.hidden_size, generator=generator)
        low, high = (torch.tensor(v, dtype=torch.float32) for v in (tok.stats.q01, tok.stats.q99))
        actions = low + (high - low) * torch.rand(PARITY_ROWS, cfg.chunk_len, cfg.action_dim, generator=generator)
        encoded = tok.encode(actions)
        source = (f"no --features given: seeded random rows (seed {seed}): exit hidden ~ N(0, 1), tokens from encoding uniform "
                  "random actions within q01..q99 and uniform random tokens")
    else:
        from rsd.training.features import load_features

        feats = load_features(features)
        if feats.index.get("main_fingerprint") != meta["main_fingerprint"] or feats.exit_layer != head.config.exit_layer:
            raise CheckpointError(f"{features}: features of main model {feats.index.get('main_fingerprint')!r} at exit layer "
                                  f"{feats.exit_layer}, but the draft was trained for {meta['main_fingerprint']!r} at exit layer "
                                  f"{head.config.exit_layer}. Pass the features the draft was trained on.")
        episodes = [int(e) for e in meta.get("val_episodes", [])]
        rows = feats.rows(episodes)
        if len(rows) == 0:
            raise DataError(f"{features}: expected frames of the draft's held-out episodes {episodes[:10]}, found none. "
                            "Pass the features the draft was trained on, or omit --features to check on random rows.")
        rows = rows[:: max(1, len(rows) // PARITY_ROWS)][:PARITY_ROWS]
        rows = rows.repeat(math.ceil(8 / len(rows)))[: max(8, len(rows))]  # at least 8 rows, so batches 1, 5 and N differ
        hidden = feats.exit_hidden[rows].float()
        encoded = layers_to_tokens(feats.gt_tokens[rows], cfg.chunk_len, cfg.latent_dim)
        source = f"held-out episodes of {features} ({len(episodes)} episodes), ground-truth tokens and uniform random tokens"
    tokens = torch.cat([encoded.to(torch.int64), random_tokens])
    return hidden, tokens, {"source": source, "rows": len(hidden), "decoder_rows": len(tokens), "seed": seed}


def _graphs(head: DraftHead, tok: ActionTokenizer, precision: str, device: torch.device) -> list[_Graph]:
    """The draft graph (in `precision`) and the fp32 decoder graphs for c = C and c = L."""
    cfg, dtype = tok.config, DTYPES[precision]
    dtype_name = str(dtype).replace("torch.", "")
    draft_io = {
        "inputs": {"exit_hidden": {"shape": ["B", head.config.hidden_size], "dtype": dtype_name}},
        "outputs": {"logits": {"shape": ["B", cfg.coarse_layers, cfg.tokens_per_layer, cfg.levels], "dtype": dtype_name},
                    "tokens": {"shape": ["B", cfg.coarse_layers, cfg.tokens_per_layer], "dtype": "int64"},
                    "confidence": {"shape": ["B"], "dtype": "float32"},
                    "confidence_min": {"shape": ["B"], "dtype": "float32"}},
    }
    graphs = [_Graph("draft", DraftGraph(_copy_draft(head, device, dtype)).eval(),
                     torch.randn(TRACE_BATCH, head.config.hidden_size, device=device, dtype=dtype), "exit_hidden",
                     ("logits", "tokens", "confidence", "confidence_min"), precision, draft_io)]
    for c in (cfg.coarse_layers, cfg.num_layers):
        decoder_io = {"inputs": {"tokens": {"shape": ["B", cfg.chunk_len, cfg.latent_dim, c], "dtype": "int64"}},
                      "outputs": {"actions": {"shape": ["B", cfg.chunk_len, cfg.action_dim], "dtype": "float32"}},
                      "note": DECODER_NOTE}
        example = torch.randint(0, cfg.levels, (TRACE_BATCH, cfg.chunk_len, cfg.latent_dim, c), device=device)
        graphs.append(_Graph(f"decoder_c{c}", tok.decoder_module().to(device).eval(), example, "tokens", ("actions",), "fp32", decoder_io))
    return graphs


def _copy_draft(head: DraftHead, device: torch.device, dtype: torch.dtype) -> DraftHead:
    """A copy of the draft on `device` in `dtype` (the loaded one stays fp32 for the references)."""
    copy = DraftHead(head.config)
    copy.load_state_dict(head.state_dict())
    return copy.to(device, dtype).eval()


def _references(head: DraftHead, tok: ActionTokenizer, precision: str, device: torch.device) -> dict[str, Any]:
    """Eager PyTorch engines the exported ones are compared with (the draft in fp32 and in `precision`)."""
    cfg = tok.config
    return {
        "draft": TorchDraftEngine(_copy_draft(head, device, DTYPES[precision])),
        "draft_fp32": TorchDraftEngine(_copy_draft(head, device, torch.float32)),
        **{f"decoder_c{c}": TorchDecoderEngine(tok.decoder_module().to(device), c) for c in (cfg.coarse_layers, cfg.num_layers)},
    }


def _build_engine(fmt: str, graph: _Graph, staging: Path, references: dict[str, Any], hidden: torch.Tensor,
                  tokens: torch.Tensor, dry_run: bool, opset: int | None, device: torch.device) -> dict[str, Any]:
    """Export one graph to `fmt`, load it back as a runtime engine and check parity; return its manifest entry."""
    path = staging / f"{graph.name}{SUFFIX[fmt]}"
    entry: dict[str, Any] = {"name": graph.name, "format": fmt, "precision": graph.precision, **graph.io,
                             "versions": {"torch": torch.__version__}, "files": []}
    if fmt == "tensorrt":
        entry["tensorrt"] = {"min_batch": TRT_BATCH[0], "opt_batch": TRT_BATCH[1], "max_batch": TRT_BATCH[2], "ir": "dynamo"}
        if dry_run:
            log.info("export-draft: dry run, %s (tensorrt, %s) planned as %s, not built", graph.name, graph.precision, path.name)
            return {**entry, "built": False, "planned_files": [path.name], "reason": "dry run: planned, not built"}
    started = time.perf_counter()
    try:
        files, info = EXPORTERS[fmt](graph, path, opset, device)
        engine = _runtime_engine(fmt, graph, path, device)
        seconds = time.perf_counter() - started
        if graph.name == "draft":
            parity = _draft_parity(engine, references["draft"], references["draft_fp32"], hidden, graph.precision)
        else:
            parity = _decoder_parity(engine, references[graph.name], tokens[..., : int(graph.name.removeprefix("decoder_c"))])
    except _runtime_errors() as error:
        if graph.precision != "fp16":
            raise
        for stale in staging.glob(f"{path.name}*"):
            stale.unlink()
        reason = f"fp16 {fmt} does not build or run on {device}: {type(error).__name__}: {str(error)[:300]}"
        log.warning("export-draft: %s; %s not built for this format", reason, graph.name)
        return {**entry, "built": False, "reason": reason}
    label = f"{graph.name} ({fmt}, {graph.precision})"
    log.info("export-draft: %s built in %.2f s, %s", label, seconds, parity)
    _check_parity(label, parity, graph.precision if graph.name == "draft" else None)
    entry["versions"].update(info.pop("versions", {}))
    return {**entry, **info, "files": [file_entry(staging, f) for f in files], "parity": parity,
            "export_seconds": round(seconds, 3), "built": True}


def _runtime_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean a format cannot build or run a graph here (ONNX Runtime raises its own classes)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    return (RuntimeError, NotImplementedError, ort_state.Fail, ort_state.NotImplemented, ort_state.InvalidGraph,
            ort_state.RuntimeException)


def _export_onnx(graph: _Graph, path: Path, opset: int | None, device: torch.device) -> tuple[list[Path], dict[str, Any]]:
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


def _export_torchscript(graph: _Graph, path: Path, opset: int | None, device: torch.device) -> tuple[list[Path], dict[str, Any]]:
    """`torch.jit.trace` at TRACE_BATCH and save `.ts` (parity at other batch sizes checks the trace is batch-generic)."""
    with warnings.catch_warnings():
        # the draft's input-shape check becomes a constant in the trace; parity at batches 1, 5 and N covers it
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(graph.module, (graph.example,), check_trace=False)
    traced.save(str(path))
    return [path], {"exporter": "torch.jit.trace"}


def _export_tensorrt(graph: _Graph, path: Path, opset: int | None, device: torch.device) -> tuple[list[Path], dict[str, Any]]:
    """torch-tensorrt (ir="dynamo") with a dynamic batch profile, saved as an exported program `*.trt.ep` (CUDA only)."""
    require_tensorrt(device)
    import torch_tensorrt

    shape = tuple(graph.example.shape[1:])
    low, opt, high = TRT_BATCH
    inputs = [torch_tensorrt.Input(min_shape=(low, *shape), opt_shape=(opt, *shape), max_shape=(high, *shape),
                                   dtype=graph.example.dtype, name=graph.input_name)]
    precisions = {DTYPES[graph.precision]}
    compiled = torch_tensorrt.compile(graph.module, ir="dynamo", inputs=inputs, enabled_precisions=precisions, min_block_size=1)
    torch_tensorrt.save(compiled, str(path), output_format="exported_program", arg_inputs=inputs, retrace=True)
    return [path], {"exporter": "torch_tensorrt.compile(ir=dynamo)", "versions": {"torch_tensorrt": torch_tensorrt.__version__}}


EXPORTERS: dict[str, Callable[[_Graph, Path, int | None, torch.device], tuple[list[Path], dict[str, Any]]]] = {
    "onnx": _export_onnx,
    "torchscript": _export_torchscript,
    "tensorrt": _export_tensorrt,
}


def _runtime_engine(fmt: str, graph: _Graph, path: Path, device: torch.device) -> Any:
    """Load the exported file through the runtime's engine class (what the bundle loader builds)."""
    if graph.name == "draft":
        return DRAFT_ENGINES[fmt](path, device, DTYPES[graph.precision])
    return DECODER_ENGINES[fmt](path, device, graph.example.shape[-1])


def _batches(rows: torch.Tensor) -> list[torch.Tensor]:
    """Slices of 1, 5 and all rows: batch sizes other than the traced one."""
    sizes = sorted({1, min(5, len(rows)), len(rows)})
    return [rows[:size] for size in sizes]


@torch.inference_mode()
def _draft_parity(engine: Any, reference: Any, reference_fp32: Any, hidden: torch.Tensor, precision: str) -> dict[str, Any]:
    """Logits / confidence max |diff| and token agreement of a draft engine against eager PyTorch."""
    logits_diff = conf_diff = conf_min_diff = 0.0
    agree = agree_fp32 = total = 0
    for batch in _batches(hidden):
        got, want, want32 = engine(batch), reference(batch), reference_fp32(batch)
        if tuple(got[0].shape) != tuple(want[0].shape) or got[1].dtype != torch.int64:
            raise ParityError(f"draft ({engine.name}): expected logits {tuple(want[0].shape)} and int64 tokens at batch "
                              f"{len(batch)}, got {tuple(got[0].shape)} and {got[1].dtype}; the batch dimension is not dynamic.")
        logits_diff = max(logits_diff, (got[0].float().cpu() - want[0].float().cpu()).abs().max().item())
        conf_diff = max(conf_diff, (got[2].float().cpu() - want[2].float().cpu()).abs().max().item())
        conf_min_diff = max(conf_min_diff, (got[3].float().cpu() - want[3].float().cpu()).abs().max().item())
        agree += int((got[1].cpu() == want[1].cpu()).sum())
        agree_fp32 += int((got[1].cpu() == want32[1].cpu()).sum())
        total += got[1].numel()
    figures = {"reference": f"torch eager {precision}", "batch_sizes": [len(b) for b in _batches(hidden)],
               "logits_max_abs": logits_diff, "token_agreement": agree / total, "confidence_max_abs": conf_diff,
               "confidence_min_max_abs": conf_min_diff, "tolerances": TOLERANCES[precision]}
    if precision != "fp32":
        figures["token_agreement_vs_fp32_eager"] = agree_fp32 / total
    return figures


@torch.inference_mode()
def _decoder_parity(engine: Any, reference: Any, tokens: torch.Tensor) -> dict[str, Any]:
    """Actions max |diff| of a decoder engine against eager PyTorch on tokens `[M, H, d, c]`."""
    diff = scale = 0.0
    for batch in _batches(tokens):
        got, want = engine(batch), reference(batch)
        if tuple(got.shape) != tuple(want.shape):
            raise ParityError(f"{engine.name} decoder: expected actions {tuple(want.shape)} at batch {len(batch)}, "
                              f"got {tuple(got.shape)}; the batch dimension is not dynamic.")
        diff = max(diff, (got.float().cpu() - want.float().cpu()).abs().max().item())
        scale = max(scale, want.abs().max().item())
    return {"reference": "torch eager fp32", "batch_sizes": [len(b) for b in _batches(tokens)], "actions_max_abs": diff,
            "tolerance": ACTION_TOLERANCE * max(1.0, scale)}


def _check_parity(label: str, parity: dict[str, Any], draft_precision: str | None) -> None:
    """Raise ParityError when a figure is outside its tolerance."""
    failures = []
    if draft_precision is None:
        if not parity["actions_max_abs"] <= parity["tolerance"]:
            failures.append(f"actions max |diff| {parity['actions_max_abs']:.3e} above {parity['tolerance']:.1e}")
    else:
        tol = TOLERANCES[draft_precision]
        if not parity["token_agreement"] >= tol["min_token_agreement"]:
            failures.append(f"token agreement {100 * parity['token_agreement']:.3f} % below {100 * tol['min_token_agreement']:.1f} %")
        if not parity["logits_max_abs"] <= tol["logits_max_abs"]:
            failures.append(f"logits max |diff| {parity['logits_max_abs']:.3e} above {tol['logits_max_abs']:.1e}")
        worst_conf = max(parity["confidence_max_abs"], parity["confidence_min_max_abs"])
        if not worst_conf <= tol["confidence_max_abs"]:
            failures.append(f"confidence max |diff| {worst_conf:.3e} above {tol['confidence_max_abs']:.1e}")
    if failures:
        raise ParityError(f"{label}: the exported engine does not compute what PyTorch computes: {'; '.join(failures)}. "
                          "Nothing was written as valid (no manifest). Try another --opset or format, or report the export bug.")


def _manifest(head: DraftHead, tok: ActionTokenizer, meta: dict[str, Any], gate: dict[str, Any], precision: str,
              parity_inputs: dict[str, Any], sources: list[dict[str, Any]], engines: list[dict[str, Any]],
              device: torch.device) -> dict[str, Any]:
    """The bundle manifest (written only after every engine passed parity)."""
    cfg = tok.config
    return {
        "kind": BUNDLE_KIND,
        "format_version": FORMAT_VERSION,
        "rsd_version": rsd.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "main_fingerprint": meta["main_fingerprint"],
        "exit_layer": head.config.exit_layer,
        "tau": gate["tau"],
        "gate_statistic": gate["gate_statistic"],
        "calibrated": gate["calibrated"],
        "calibration": gate["calibration"],
        "shapes": {
            "hidden_size": head.config.hidden_size,
            "exit_layer": head.config.exit_layer,
            "chunk_len": cfg.chunk_len,
            "action_dim": cfg.action_dim,
            "latent_dim": cfg.latent_dim,
            "num_layers": cfg.num_layers,
            "coarse_layers": cfg.coarse_layers,
            "levels": cfg.levels,
            "batch": f"dynamic, 1..{MAX_BATCH} (ONNX), {TRT_BATCH[0]}..{TRT_BATCH[2]} (TensorRT)",
            "tokenizer": to_dict(cfg),
        },
        "draft_config": to_dict(head.config),
        "draft_parameters": head.num_parameters(),
        "precision": precision,
        "decoder_precision": "fp32",
        "precision_note": DECODER_NOTE,
        "normalisation": tok.stats.to_json(),
        "export_device": str(device),
        "parity_inputs": parity_inputs,
        "sources": sources,
        "engines": engines,
    }
