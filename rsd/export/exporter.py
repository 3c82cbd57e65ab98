"""export-draft: compile the draft and the RFSQ decoder, check them against PyTorch, and write a bundle.

The runtime should run the draft (exit hidden → coarse logits and tokens) and the decoders for
c = C and c = L through whatever is fastest on the device — AOTInductor, ONNX Runtime, TorchScript or torch-tensorrt — but
a compiled graph is only worth running if it computes what the trained PyTorch module computes. This module
runs the export: `rsd.export.compile` writes each format's files, `rsd.export.parity` loads them back through
the runtime's own engine classes and compares them with eager PyTorch, and the bundle (`rsd.bundle`) is
assembled in a staging folder beside `out` (`rsd.io.staged_dir`) and moved into place only after every check passed,
so a failed export never leaves a manifest that marks anything valid, and an earlier bundle at `out` is replaced
(with `overwrite`) only by a complete one.

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

import logging
import math
import shutil
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import rsd
from rsd.bundle import BUNDLE_KIND, TOKENIZER_DIR, file_entry, write_manifest
from rsd.config import to_dict
from rsd.device import check_device
from rsd.errors import CheckpointError, ConfigError, EngineError
from rsd.export.compile import DECODER_NOTE, EXPORTERS, FORMATS, MAX_BATCH, SUFFIX, TRT_BATCH, Graph, graphs
from rsd.export.parity import (
    TOLERANCES,
    check_parity,
    decoder_parity,
    draft_parity,
    parity_inputs,
    references,
    reload_engine,
)
from rsd.io import FORMAT_VERSION, read_json, sha256_file, staged_dir
from rsd.models.draft import DRAFT_FILE, DraftHead
from rsd.runtime.engines import require_tensorrt, runtime_available
from rsd.runtime.gate import Gate
from rsd.tokenizer import ActionTokenizer
from rsd.tokenizer.rfsq import TOKENIZER_FILE

log = logging.getLogger(__name__)


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
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export the draft and decoders to `formats`, check parity, write the bundle `out`; return the report.

    An existing bundle at `out` is replaced only with `overwrite=True`, and only once the new one is complete.
    """
    start = time.perf_counter()
    formats = _check_formats(formats)
    if precision not in TOLERANCES:
        raise ConfigError(f"precision: expected one of {sorted(TOLERANCES)}, got {precision!r}.")
    device = check_device(device, fix="Export with --device cpu.")
    if "tensorrt" in formats and not dry_run:
        require_tensorrt(device)
    if "onnx" in formats and not runtime_available("onnx", device):
        raise EngineError(f"export-draft --formats onnx --device {device}: ONNX parity is checked where the engine runs, and this "
                          "onnxruntime has no provider for that device. Export ONNX on the CPU (the .onnx files run anywhere), "
                          "install onnxruntime-gpu, or choose --formats torchscript or aotinductor.")
    out = Path(out)
    with staged_dir(out, BUNDLE_KIND, overwrite) as staging:
        sources = _copy_sources(Path(draft), Path(tokenizer), staging)
        head, meta = DraftHead.load(staging)
        tok = ActionTokenizer.load(staging / TOKENIZER_DIR)
        if to_dict(head.config.tokenizer) != to_dict(tok.config):
            raise CheckpointError(f"{draft}: the draft predicts tokens of config {to_dict(head.config.tokenizer)}, "
                                  f"the tokenizer {tokenizer} has {to_dict(tok.config)}. Export with the tokenizer the draft was trained on.")
        if "main_fingerprint" not in meta:
            raise CheckpointError(f"{draft}/{DRAFT_FILE}.json: expected a main_fingerprint, found none. Re-train with `rsd train-draft`.")
        gate = _read_calibration(calibration, meta["main_fingerprint"], head.config.exit_layer, tok.config.chunk_len, tok.config.coarse_layers)
        hidden, tokens, inputs_info = parity_inputs(head, tok, meta, features, seed)
        hidden, tokens = hidden.to(device), tokens.to(device)  # the engines and references run on `device`
        refs = references(head, tok, precision, device)
        engines = [_build_engine(fmt, graph, staging, refs, hidden, tokens, dry_run, opset, device)
                   for fmt in formats for graph in graphs(head, tok, precision, device)]
        write_manifest(staging, _manifest(head, tok, meta, gate, precision, inputs_info, sources, engines, device))
    report = {
        "out": str(out),
        "seconds": time.perf_counter() - start,
        "calibrated": gate["calibrated"],
        "gate": gate["gate"].to_json(),
        "parity_inputs": inputs_info,
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


def _read_calibration(path: str | Path | None, fingerprint: str, exit_layer: int, chunk_len: int, coarse_layers: int) -> dict[str, Any]:
    """The gate of a calibration.json made for the same main model and exit layer (`Gate.from_json` reads older files too)."""
    if path is None:
        log.warning("export-draft: no --calibration given; tau = inf, so the draft is never accepted until you calibrate.")
        return {"gate": Gate(tau=math.inf), "calibrated": False, "calibration": None}
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: expected a calibration.json written by `rsd calibrate`, found no file.")
    data = read_json(path, "a calibration written by `rsd calibrate`")
    if data.get("main_fingerprint") != fingerprint:
        raise CheckpointError(f"{path}: calibrated for main model fingerprint {data.get('main_fingerprint')!r}, "
                              f"but the draft was trained for {fingerprint!r}. Calibrate this draft with `rsd calibrate`.")
    if data.get("exit_layer") != exit_layer:
        raise CheckpointError(f"{path}: calibrated at exit layer {data.get('exit_layer')!r}, but the draft reads exit layer {exit_layer}.")
    return {"gate": Gate.from_json(data, str(path), chunk_len=chunk_len, coarse_layers=coarse_layers), "calibrated": True,
            "calibration": {"file": str(path), "sha256": sha256_file(path)}}


def _build_engine(fmt: str, graph: Graph, staging: Path, references: dict[str, Any], hidden: torch.Tensor,
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
        engine = reload_engine(fmt, graph, path, device)
        seconds = time.perf_counter() - started
        if graph.name == "draft":
            parity = draft_parity(engine, references["draft"], references["draft_fp32"], hidden, graph.precision)
        else:
            parity = decoder_parity(engine, references[graph.name], tokens[..., : int(graph.name.removeprefix("decoder_c"))])
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
    check_parity(label, parity, graph.precision if graph.name == "draft" else None)
    entry["versions"].update(info.pop("versions", {}))
    return {**entry, **info, "files": [file_entry(staging, f) for f in files], "parity": parity,
            "export_seconds": round(seconds, 3), "built": True}


def _runtime_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean a format cannot build or run a graph here (ONNX Runtime raises its own classes)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    return (RuntimeError, NotImplementedError, ort_state.Fail, ort_state.NotImplemented, ort_state.InvalidGraph,
            ort_state.RuntimeException)


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
        "gate": gate["gate"].to_json(),
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
