"""Load a bundle for the runtime: verify its files, check it belongs to the main model, choose and build the engines.

`load_bundle_engines` verifies the bundle (`rsd.bundle.verify_bundle`: manifest schema and digest, every file
confined to the bundle and re-hashed), then refuses a bundle made for
another main model (fingerprint, hidden width, layer count, tokenizer shape — each message names both values)
before anything runs, and builds the draft and decoder engines of `rsd.runtime.engines`: the engine asked for,
or with `engine="auto"` the first of `ENGINE_PREFERENCE` (TensorRT > AOTInductor > ONNX Runtime > TorchScript > eager)
that the bundle holds and this machine can run, logged; an AOTInductor package runs only on the device type it was
compiled for. The "torch" engine rebuilds the trained draft from
`draft.safetensors` (never from random weights) and the decoder from the bundle's tokenizer copy, so it is
always available.

Usage:
    loaded = load_bundle_engines("runs/demo/bundle", main, engine="auto")
    logits, tokens = loaded.draft(exit_hidden)
    actions = loaded.decoders[3](tokens_c3)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rsd.bundle import TOKENIZER_DIR, bundle_file, read_manifest, verify_bundle
from rsd.config import to_dict
from rsd.device import check_device, resolve_dtype
from rsd.errors import CheckpointError, EngineError
from rsd.models.draft import DraftHead
from rsd.models.main import MainModel
from rsd.runtime.engines import (
    DECODER_ENGINES,
    DRAFT_ENGINES,
    ENGINE_PREFERENCE,
    DecoderEngine,
    DraftEngine,
    TorchDecoderEngine,
    TorchDraftEngine,
    runtime_available,
)
from rsd.runtime.gate import Gate
from rsd.tokenizer import ActionTokenizer

log = logging.getLogger(__name__)


@dataclass
class LoadedBundle:
    """A bundle's engines, ready for `SpeculativeEngine`, with the gate settings it was exported with."""

    draft: DraftEngine  # exit hidden [B, hidden] -> logits, tokens
    decoders: dict[int, DecoderEngine]  # c -> tokens [B, H, d, c] -> actions [B, H, A], for c = C and c = L
    exit_layer: int  # the main model's layer the draft reads
    gate: Gate  # the calibrated gate (tau = inf when the bundle is not calibrated)
    manifest: dict[str, Any]  # the verified manifest
    engine: str  # the engine format in use


def graph_names(manifest: dict[str, Any]) -> list[str]:
    """The graphs every engine format needs: the draft and the decoders for c = C and c = L."""
    shapes = manifest["shapes"]
    return ["draft", f"decoder_c{shapes['coarse_layers']}", f"decoder_c{shapes['num_layers']}"]


def _built(manifest: dict[str, Any], fmt: str, device: torch.device) -> dict[str, dict[str, Any]] | None:
    """The built entries of `fmt` by graph name, or None unless all three graphs are built (AOTInductor: for `device`'s type)."""
    entries = {e["name"]: e for e in manifest["engines"] if e["format"] == fmt and e["built"]
               and (fmt != "aotinductor" or e.get("aotinductor", {}).get("device") == device.type)}
    return entries if all(name in entries for name in graph_names(manifest)) else None


def available_engines(bundle: str | Path, device: torch.device | str) -> list[str]:
    """Engine formats built in the bundle that run on `device`, in ENGINE_PREFERENCE order ("torch" always)."""
    manifest = read_manifest(bundle)
    device = check_device(device, fix="Load the bundle on the CPU.")
    return [fmt for fmt in ENGINE_PREFERENCE if (fmt == "torch" or _built(manifest, fmt, device)) and runtime_available(fmt, device)]


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
    dtype = resolve_dtype(manifest["precision"])
    shapes = manifest["shapes"]
    layers = (shapes["coarse_layers"], shapes["num_layers"])
    if name == "torch":
        draft_head, _ = DraftHead.load(bundle, expect_hidden=main.hidden_size, expect_exit_layer=manifest["exit_layer"],
                                       expect_fingerprint=main.fingerprint)
        tokenizer = ActionTokenizer.load(bundle / TOKENIZER_DIR).to(device)
        draft: DraftEngine = TorchDraftEngine(draft_head.to(device, dtype))
        decoders: dict[int, DecoderEngine] = {c: TorchDecoderEngine(tokenizer.decoder_module(), c) for c in layers}
    else:
        entries = _built(manifest, name, device)
        assert entries is not None, "available_engines lists only formats with every graph built"
        draft = DRAFT_ENGINES[name](bundle_file(bundle, entries["draft"]["files"][0]["path"]), device,
                                    resolve_dtype(entries["draft"]["precision"]))
        decoders = {c: DECODER_ENGINES[name](bundle_file(bundle, entries[f"decoder_c{c}"]["files"][0]["path"]), device, c) for c in layers}
    gate = Gate.from_json(manifest, str(bundle / "manifest.json"), chunk_len=shapes["chunk_len"], coarse_layers=shapes["coarse_layers"])
    return LoadedBundle(draft=draft, decoders=decoders, exit_layer=int(manifest["exit_layer"]), gate=gate, manifest=manifest, engine=name)
