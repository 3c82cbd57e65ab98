"""The bundle format: its manifest (read, write, verify every file hash) and a readable summary.

A bundle (docs/architecture.md, "The bundle") is what the runtime loads: the draft and decoder sources
(safetensors + JSON) and each exported engine file, all listed in `manifest.json` with their sha256 and size.
Nothing in a bundle is trusted before `verify_bundle` re-hashes it, so a file changed after export (a flipped
byte, a truncated copy) is refused with the file, the expected and the found hash instead of running a different
graph. `rsd.export` writes bundles and `rsd.runtime.bundle` loads them; both use this module, which needs
nothing but `rsd.io` and `rsd.errors`.

Usage:
    manifest = verify_bundle("runs/demo/bundle")
    print(format_manifest(manifest))
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rsd.errors import CheckpointError
from rsd.io import read_manifest as read_json_manifest
from rsd.io import sha256_file

MANIFEST = "manifest"  # manifest.json at the bundle's top
BUNDLE_KIND = "bundle"  # the manifest's "kind"
TOKENIZER_DIR = "tokenizer"  # the bundle's copy of the tokenizer (the "torch" engine's decoder is rebuilt from it)


def read_manifest(bundle: str | Path) -> dict[str, Any]:
    """Read `bundle/manifest.json`, checking its kind and format version (no hashing)."""
    return read_json_manifest(bundle, MANIFEST, kind=BUNDLE_KIND)


def write_manifest(bundle: str | Path, manifest: dict[str, Any]) -> Path:
    """Write `bundle/manifest.json` (the caller writes it last, once every listed file is in place)."""
    path = Path(bundle) / f"{MANIFEST}.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def listed_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file entry of the manifest: the sources, then each built engine's files."""
    files = list(manifest.get("sources", []))
    for entry in manifest.get("engines", []):
        files.extend(entry.get("files", []))
    return files


def file_entry(bundle: Path, path: Path) -> dict[str, Any]:
    """The manifest entry of one file: its path relative to the bundle, sha256 and size in bytes."""
    return {"path": path.relative_to(bundle).as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def verify_bundle(bundle: str | Path) -> dict[str, Any]:
    """Re-hash every file the manifest lists and return the manifest; a missing or changed file is a CheckpointError."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    for entry in listed_files(manifest):
        path = bundle / entry["path"]
        if not path.is_file():
            raise CheckpointError(f"{path}: the bundle manifest lists this file, found none. Re-run `rsd export-draft`.")
        found = sha256_file(path)
        if found != entry["sha256"]:
            raise CheckpointError(
                f"{path}: expected sha256 {entry['sha256']}, found {found}; the file changed after export. "
                "Re-run `rsd export-draft` or restore the file."
            )
    return manifest


def gate_fields(data: dict[str, Any], source: str) -> dict[str, Any]:
    """The gate's fields of a manifest or calibration.json: its "gate" object, or for files written before gates
    had modes, their "tau" and "gate_statistic" (a whole-chunk gate). `rsd.runtime.gate.Gate` validates them."""
    if "gate" in data:
        gate = data["gate"]
        if not isinstance(gate, dict) or "tau" not in gate:
            raise CheckpointError(f"{source}: expected \"gate\" to be an object with tau, mode, statistic and min_steps, got {gate!r}.")
        return dict(gate)
    if "tau" not in data or "gate_statistic" not in data:
        raise CheckpointError(f"{source}: expected a \"gate\" object (or the older \"tau\" and \"gate_statistic\"), found neither. "
                              "Re-run `rsd calibrate` or `rsd export-draft`.")
    return {"tau": data["tau"], "mode": "chunk", "statistic": data["gate_statistic"], "min_steps": 1}


def format_manifest(manifest: dict[str, Any]) -> str:
    """A readable summary of a bundle manifest (what `rsd inspect BUNDLE` prints)."""
    shapes = manifest["shapes"]
    gate = gate_fields(manifest, "manifest.json")
    tau = float(gate["tau"])
    tau_text = "inf (never accept)" if math.isinf(tau) else f"{tau:.4f}"
    steps_text = f", at least {gate['min_steps']} leading steps" if gate["mode"] == "prefix" else ""
    lines = [
        f"bundle (format {manifest['format_version']}, rsd {manifest['rsd_version']}, created {manifest['created']})",
        f"main model fingerprint: {manifest['main_fingerprint']}",
        f"exit layer {manifest['exit_layer']}; {gate['mode']} gate, tau {tau_text} on the {gate['statistic']} confidence{steps_text}"
        + ("" if manifest["calibrated"] else " (NOT calibrated)"),
        f"shapes: hidden {shapes['hidden_size']}, chunk H={shapes['chunk_len']}, actions A={shapes['action_dim']}, "
        f"latent d={shapes['latent_dim']}, layers C={shapes['coarse_layers']} of L={shapes['num_layers']}, V={shapes['levels']} levels",
        f"draft precision {manifest['precision']} ({manifest['draft_parameters']:,} parameters); "
        f"parity inputs: {manifest['parity_inputs']['source']} ({manifest['parity_inputs']['rows']} rows)",
        "",
        f"{'engine':<12} {'format':<12} {'precision':<9} {'built':<6} {'export s':>8} {'MB':>8}  parity",
    ]
    for entry in manifest["engines"]:
        size = sum(f["bytes"] for f in entry["files"]) / 1e6
        seconds = entry.get("export_seconds")
        lines.append(
            f"{entry['name']:<12} {entry['format']:<12} {entry['precision']:<9} {'yes' if entry['built'] else 'no':<6} "
            f"{'-' if seconds is None else f'{seconds:.2f}':>8} {size:>8.2f}  {parity_text(entry)}"
        )
    lines.append("")
    lines.append("files:")
    for entry in listed_files(manifest):
        lines.append(f"  {entry['path']:<34} {entry['bytes']:>12,} B  sha256 {entry['sha256'][:16]}…")
    return "\n".join(lines)


def parity_text(entry: dict[str, Any]) -> str:
    """One line of parity figures (or why there are none)."""
    if not entry["built"]:
        return entry.get("reason", "not built")
    parity = entry["parity"]
    if "token_agreement" in parity:
        versus_fp32 = parity.get("token_agreement_vs_fp32_eager")
        return (f"tokens {100 * parity['token_agreement']:.2f}%"
                + ("" if versus_fp32 is None else f" ({100 * versus_fp32:.2f}% vs fp32 eager)")
                + f", logits max |diff| {parity['logits_max_abs']:.2e}, confidence max |diff| {parity['confidence_max_abs']:.2e}")
    return f"actions max |diff| {parity['actions_max_abs']:.2e}"
