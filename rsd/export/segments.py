"""export-segments: the main model's segments for one exit layer as AOTInductor `.pt2` packages, parity-checked and hashed.

The draft and decoders ship in the bundle; the milliseconds are in the main model. This packages its segments —
vision + embeddings, the prefix (layers 0..k-1), the suffix (layers k..N-1 with the final norm and readout), the
main-only path (layers 0..N-1 with the readout: the baseline `MainOnlyPolicy` runs the same packages) and the RFSQ
head — with `torch.export` + AOTInductor at static shapes (prompt padded to `prompt_tokens`, a fixed
batch), so a deployment runs them without the model's Python code (the processor and the dataset statistics
still come from the policy folder). Each package is loaded back and compared with the eager segment on two
inputs (hidden states within the export-parity tolerance of the model's precision, identical head tokens);
`segments.json` records the main model's fingerprint, the shapes, the device and every file's sha256, and the
runtime (`CompileConfig(mode="aot", packages=...)`) refuses a changed file or another model.

Usage:
    rsd export-segments --main runs/demo/policy --exit-layer 3 --out runs/demo/segments_k3
    policy = SpeculativePolicy.from_bundle(bundle, main, compile=CompileConfig(mode="aot", packages="runs/demo/segments_k3"))
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import rsd
from rsd.bundle import file_entry
from rsd.device import dtype_name
from rsd.errors import ConfigError, ParityError
from rsd.export.parity import TOLERANCES
from rsd.io import FORMAT_VERSION, staged_dir
from rsd.models.main import MainModel
from rsd.runtime.compiled import SEGMENTS_FILE, SEGMENTS_KIND, CompileConfig, CompiledSegments, Segments, segment_name

log = logging.getLogger(__name__)


@torch.inference_mode()
def export_main_segments(main: MainModel, exit_layer: int, out: str | Path, prompt_tokens: int = 48, batch: int = 1,
                         overwrite: bool = False) -> dict[str, Any]:
    """Package embed, prefix(k), suffix(k), the main-only path and head of `main` as `.pt2` files in `out`; check parity;
    return the manifest."""
    if not 1 <= exit_layer < main.num_layers:
        raise ConfigError(f"export-segments --exit-layer: expected an int in 1..{main.num_layers - 1}, got {exit_layer}.")
    started = time.perf_counter()
    config = CompileConfig(mode="aot", prompt_tokens=prompt_tokens, batch=batch)
    precision = "fp16" if next(main.vla.parameters()).dtype != torch.float32 else "fp32"
    with staged_dir(out, SEGMENTS_KIND, overwrite) as staging:
        packaged = CompiledSegments(main, config, package_dir=staging)
        eager = Segments(main)
        parity: dict[str, float] = {"hidden_max_abs": 0.0, "query_hidden_max_abs": 0.0, "token_agreement": 1.0}
        for seed in (0, 1):
            inputs = packaged.prepare(main.vla.random_inputs(batch=batch, prompt_len=prompt_tokens, seed=seed))
            got_start, want_start = packaged.embed(inputs), eager.embed(inputs)
            got, want = packaged.advance(got_start, exit_layer), eager.advance(want_start, exit_layer)
            parity["hidden_max_abs"] = max(parity["hidden_max_abs"], (got.hidden - want.hidden).abs().max().item())
            for got_state, want_state in ((got, want), (got_start, want_start)):  # the speculative suffix, the main-only path
                got_hidden, want_hidden = packaged.resume(got_state), eager.resume(want_state)
                parity["query_hidden_max_abs"] = max(parity["query_hidden_max_abs"], (got_hidden - want_hidden).abs().max().item())
                agree = (packaged.head(got_hidden) == eager.head(want_hidden)).float().mean().item()
                parity["token_agreement"] = min(parity["token_agreement"], agree)
        _check(parity, precision)
        keys = (("embed",), ("layers", 0, exit_layer), ("readout", exit_layer), ("readout", 0), ("head",))
        names = [segment_name(key) for key in keys]
        manifest = {
            "kind": SEGMENTS_KIND,
            "format_version": FORMAT_VERSION,
            "rsd_version": rsd.__version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "main_fingerprint": main.fingerprint,
            "exit_layer": exit_layer,
            "num_layers": main.num_layers,
            "prompt_tokens": prompt_tokens,
            "batch": batch,
            "device": packaged.device.type,
            "dtype": dtype_name(next(main.vla.parameters()).dtype),
            "exporter": "torch.export + AOTInductor",
            "versions": {"torch": torch.__version__},
            "parity": {**parity, "reference": f"eager segments, {precision}", "tolerances": TOLERANCES[precision]},
            "files": [{"name": name, **file_entry(staging, staging / f"{name}.pt2")} for name in names],
            "seconds": round(time.perf_counter() - started, 1),
        }
        (staging / f"{SEGMENTS_FILE}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("export-segments: wrote %s (exit layer %d) in %.1f s, parity %s", out, exit_layer, manifest["seconds"], parity)
    return manifest


def _check(parity: dict[str, float], precision: str) -> None:
    """Raise ParityError when a packaged segment computes something else than the eager one."""
    tolerance = TOLERANCES[precision]
    worst = max(parity["hidden_max_abs"], parity["query_hidden_max_abs"])
    if worst > tolerance["logits_max_abs"] or parity["token_agreement"] < tolerance["min_token_agreement"]:
        raise ParityError(f"export-segments: the packaged segments do not compute what the eager model computes: hidden max |diff| "
                          f"{worst:.3e} (tolerance {tolerance['logits_max_abs']:.1e}), head token agreement "
                          f"{100 * parity['token_agreement']:.2f} % (needed {100 * tolerance['min_token_agreement']:.0f} %). "
                          "Nothing was written.")
