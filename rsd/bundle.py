"""The bundle format: its manifest (schema, read, write, verify every file hash) and a readable summary.

A bundle (docs/architecture.md, "The bundle") is what the runtime loads: the draft and decoder sources
(safetensors + JSON) and each exported engine file, all listed in `manifest.json` with their sha256 and size.
Nothing in a bundle is trusted before `verify_bundle` has checked it, in this order:

1. the manifest is a JSON object of kind "bundle" and this format version, and every field rsd reads has the
   type and range of the schema (`validate_manifest`; each violation a CheckpointError naming the field, what was
   expected and what was found), before anything else reads it;
2. the manifest's own sha256 matches the one recorded beside it in `manifest.sha256` (`sha256sum -c` reads it),
   so a manifest edited after export is refused; a bundle written before rsd recorded it is reported unsigned;
3. every listed file is confined to the bundle: a relative, normalised path (no absolute path, no `..`) that does
   not resolve outside the bundle through a symbolic link (`bundle_file`), so a manifest can never make rsd
   hash, print or run a file from elsewhere;
4. every listed file is re-hashed, so a file changed after export (a flipped byte, a truncated copy) is refused
   with the file, the expected and the found hash instead of running a different graph.

The digest catches a manifest edited by hand or by a tool that does not know about it; it is not a signature
against someone who rewrites both files on purpose. Confinement is what keeps any bundle, edited or not, from
reaching outside its folder. `rsd.export` writes bundles and `rsd.runtime.bundle` loads them; both use this
module, which needs nothing but the ground layer.

Usage:
    manifest = verify_bundle("runs/demo/bundle")
    print(format_manifest(manifest))
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path, PurePosixPath
from typing import Any

from rsd.config import TokenizerConfig, from_dict
from rsd.errors import CheckpointError, ConfigError
from rsd.io import read_manifest as read_json_manifest
from rsd.io import sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest"  # manifest.json at the bundle's top
DIGEST_FILE = "manifest.sha256"  # the manifest's own sha256, in `sha256sum` format
BUNDLE_KIND = "bundle"  # the manifest's "kind"
TOKENIZER_DIR = "tokenizer"  # the bundle's copy of the tokenizer (the "torch" engine's decoder is rebuilt from it)
ENGINE_FORMATS = ("onnx", "torchscript", "tensorrt", "aotinductor")  # engine file formats a bundle can hold
PRECISIONS = ("fp32", "fp16")  # engine precisions export builds
REQUIRED_SOURCES = ("draft.safetensors", "draft.json", f"{TOKENIZER_DIR}/tokenizer.safetensors", f"{TOKENIZER_DIR}/tokenizer.json")
SHAPE_FIELDS = ("hidden_size", "chunk_len", "action_dim", "latent_dim", "num_layers", "coarse_layers", "levels")
LARGEST_INT = 2**53  # JSON integers beyond this are refused (they cannot round-trip through a float)
SHA256 = re.compile(r"[0-9a-f]{64}")
MISSING = object()  # a field the manifest does not have


def read_manifest(bundle: str | Path) -> dict[str, Any]:
    """Read `bundle/manifest.json`: a JSON object of kind "bundle", this format version, valid against the schema."""
    path = Path(bundle) / f"{MANIFEST}.json"
    if path.exists() or path.is_symlink():
        bundle_file(bundle, path.name)
    return validate_manifest(read_json_manifest(bundle, MANIFEST, kind=BUNDLE_KIND), path)


def write_manifest(bundle: str | Path, manifest: dict[str, Any]) -> Path:
    """Check `manifest` against the schema, write `bundle/manifest.json` and its digest (the caller writes them last)."""
    path = Path(bundle) / f"{MANIFEST}.json"
    validate_manifest(manifest, path)
    text = json.dumps(manifest, indent=2) + "\n"
    path.write_text(text)
    (Path(bundle) / DIGEST_FILE).write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  {path.name}\n")
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


def bundle_file(bundle: str | Path, relative: str) -> Path:
    """The file a manifest entry names, refused unless its path is relative, normalised and resolves inside the bundle."""
    bundle = Path(bundle)
    problem = path_problem(relative)
    if problem:
        raise CheckpointError(f"{bundle}: a listed file path must be relative and inside the bundle, got {relative!r} ({problem}).")
    try:
        root, resolved = bundle.resolve(strict=True), (bundle / relative).resolve()
    except (OSError, RuntimeError) as error:
        raise CheckpointError(f"{bundle / relative}: expected a file inside the bundle, got a path that does not resolve ({error}).") from error
    if not resolved.is_relative_to(root):
        raise CheckpointError(f"{bundle / relative}: expected a file inside the bundle {root}, got a link that resolves to {resolved}. "
                              "A bundle may only hold its own files; re-export it.")
    return bundle / relative


def path_problem(relative: object) -> str:
    """Why `relative` is not a normalised path inside a folder ("" when it is one)."""
    if not isinstance(relative, str) or not relative:
        return "not a non-empty string"
    if "\x00" in relative or "\\" in relative:
        return "it holds a NUL byte or a backslash"
    if relative.startswith("/") or re.match(r"[A-Za-z]:", relative):
        return "an absolute path"
    parts = relative.split("/")
    if ".." in parts:
        return "it climbs out with '..'"
    if any(part in ("", ".") for part in parts) or PurePosixPath(relative).as_posix() != relative:
        return "not normalised (empty or '.' parts)"
    return ""


def manifest_digest(bundle: str | Path) -> str | None:
    """The manifest's sha256 when `manifest.sha256` records it and it matches; None when the bundle records none."""
    bundle = Path(bundle)
    record, manifest = bundle / DIGEST_FILE, bundle / f"{MANIFEST}.json"
    if not record.exists() and not record.is_symlink():
        return None
    bundle_file(bundle, DIGEST_FILE)
    match = re.fullmatch(rf"([0-9a-f]{{64}})  {MANIFEST}\.json\n?", record.read_text(errors="replace")) if record.is_file() else None
    if match is None:
        raise CheckpointError(f"{record}: expected one line '<sha256>  {manifest.name}', got something else. Re-export the bundle.")
    found = sha256_file(manifest)
    if found != match.group(1):
        raise CheckpointError(f"{manifest}: expected sha256 {match.group(1)} (recorded in {DIGEST_FILE}), found {found}; the manifest "
                              "was edited after export. Re-run `rsd export-draft` or restore the manifest.")
    return found


def verify_bundle(bundle: str | Path) -> dict[str, Any]:
    """Check the manifest (schema, digest), confine and re-hash every listed file; return the manifest.

    Anything missing, malformed, edited, outside the bundle or changed is a CheckpointError.
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if manifest_digest(bundle) is None:
        log.warning("bundle %s records no manifest digest (%s; written before rsd recorded one): edits to manifest.json cannot be "
                    "detected. Re-export it to add one.", bundle, DIGEST_FILE)
    for entry in listed_files(manifest):
        path = bundle_file(bundle, entry["path"])
        if not path.is_file():
            raise CheckpointError(f"{path}: the bundle manifest lists this file, found none. Re-run `rsd export-draft`.")
        found = sha256_file(path)
        if found != entry["sha256"]:
            raise CheckpointError(
                f"{path}: expected sha256 {entry['sha256']}, found {found}; the file changed after export. "
                "Re-run `rsd export-draft` or restore the file."
            )
    return manifest


def validate_manifest(manifest: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """Check every field rsd reads against the bundle schema and return the manifest; the first violation is a CheckpointError.

    Each message names the field, the expected type or range and what was found. Fields rsd does not read are
    left alone (later versions may add some).
    """

    def need(ok: bool, field: str, expected: str, found: object) -> None:
        if not ok:
            shown = "nothing (the field is missing)" if found is MISSING else _shown(found)
            raise CheckpointError(f"{source}: field {field!r}: expected {expected}, found {shown}. Re-export the bundle with `rsd export-draft`.")

    def obj(container: dict[str, Any], key: str, field: str) -> dict[str, Any]:
        value = container.get(key, MISSING)
        need(isinstance(value, dict), field, "a JSON object", value)
        return value

    def files(container: dict[str, Any], key: str, field: str) -> list[dict[str, Any]]:
        value = container.get(key, MISSING)
        need(isinstance(value, list), field, "a list of file entries", value)
        for index, entry in enumerate(value):
            where = f"{field}[{index}]"
            need(isinstance(entry, dict), where, "a file entry {path, sha256, bytes}", entry)
            path = entry.get("path", MISSING)
            problem = path_problem(path) if path is not MISSING else "missing"
            need(not problem, f"{where}.path", f"a relative, normalised path inside the bundle ({problem})", path)
            need(isinstance(entry.get("sha256"), str) and SHA256.fullmatch(entry["sha256"]) is not None, f"{where}.sha256",
                 "64 lowercase hex digits", entry.get("sha256", MISSING))
            need(_is_int(entry.get("bytes")), f"{where}.bytes", "an int >= 0", entry.get("bytes", MISSING))
        return value

    for key in ("rsd_version", "created", "main_fingerprint"):
        need(isinstance(manifest.get(key), str), key, "a string", manifest.get(key, MISSING))
    need(_is_int(manifest.get("exit_layer")), "exit_layer", "an int >= 0", manifest.get("exit_layer", MISSING))
    gate = gate_fields(manifest, source)  # values are checked by rsd.runtime.gate.Gate when the bundle loads
    need(_is_number(gate["tau"]), "gate.tau", "a number", gate["tau"])
    need(gate["mode"] in ("chunk", "prefix"), "gate.mode", "'chunk' or 'prefix'", gate["mode"])
    need(gate["statistic"] in ("mean", "min", "step"), "gate.statistic", "'mean', 'min' or 'step'", gate["statistic"])
    need(_is_int(gate["min_steps"], 1), "gate.min_steps", "an int >= 1", gate["min_steps"])
    need(gate["max_steps"] is None or _is_int(gate["max_steps"], 1), "gate.max_steps", "null or an int >= 1", gate["max_steps"])
    need(gate["layers"] is None or _is_int(gate["layers"], 1), "gate.layers", "null or an int >= 1", gate["layers"])
    need(isinstance(manifest.get("calibrated"), bool), "calibrated", "true or false", manifest.get("calibrated", MISSING))
    need(manifest.get("calibration") is None or isinstance(manifest.get("calibration"), dict), "calibration", "null or a JSON object",
         manifest.get("calibration"))
    need(_is_int(manifest.get("draft_parameters")), "draft_parameters", "an int >= 0", manifest.get("draft_parameters", MISSING))
    need(manifest.get("precision") in PRECISIONS, "precision", f"one of {list(PRECISIONS)}", manifest.get("precision", MISSING))
    shapes = obj(manifest, "shapes", "shapes")
    for key in SHAPE_FIELDS:
        need(_is_int(shapes.get(key), 1), f"shapes.{key}", "an int >= 1", shapes.get(key, MISSING))
    need(shapes.get("exit_layer") == manifest["exit_layer"], "shapes.exit_layer", f"the manifest's exit_layer {manifest['exit_layer']}",
         shapes.get("exit_layer", MISSING))
    try:
        tokenizer = from_dict(TokenizerConfig, obj(shapes, "tokenizer", "shapes.tokenizer"))
    except ConfigError as error:
        raise CheckpointError(f"{source}: field 'shapes.tokenizer': expected a tokenizer config, found one that is not ({error})") from error
    for key in SHAPE_FIELDS[1:]:
        need(shapes[key] == getattr(tokenizer, key), f"shapes.{key}", f"the tokenizer's {key} {getattr(tokenizer, key)}", shapes[key])
    obj(manifest, "draft_config", "draft_config")
    parity_inputs = obj(manifest, "parity_inputs", "parity_inputs")
    need(isinstance(parity_inputs.get("source"), str), "parity_inputs.source", "a string", parity_inputs.get("source", MISSING))
    need(_is_int(parity_inputs.get("rows")), "parity_inputs.rows", "an int >= 0", parity_inputs.get("rows", MISSING))
    sources = {entry["path"] for entry in files(manifest, "sources", "sources")}
    missing = [name for name in REQUIRED_SOURCES if name not in sources]
    need(not missing, "sources", f"entries for {list(REQUIRED_SOURCES)}", f"a list without {missing}")
    engines = manifest.get("engines", MISSING)
    need(isinstance(engines, list), "engines", "a list of engine entries", engines)
    for index, entry in enumerate(engines):
        where = f"engines[{index}]"
        need(isinstance(entry, dict), where, "an engine entry (a JSON object)", entry)
        need(isinstance(entry.get("name"), str), f"{where}.name", "a string", entry.get("name", MISSING))
        need(entry.get("format") in ENGINE_FORMATS, f"{where}.format", f"one of {list(ENGINE_FORMATS)}", entry.get("format", MISSING))
        need(entry.get("precision") in PRECISIONS, f"{where}.precision", f"one of {list(PRECISIONS)}", entry.get("precision", MISSING))
        need(isinstance(entry.get("built"), bool), f"{where}.built", "true or false", entry.get("built", MISSING))
        need(entry.get("export_seconds") is None or _is_number(entry["export_seconds"]), f"{where}.export_seconds", "null or a number",
             entry.get("export_seconds"))
        built_files = files(entry, "files", f"{where}.files")
        if entry["built"]:
            need(bool(built_files), f"{where}.files", "at least one file for a built engine", built_files)
            parity = obj(entry, "parity", f"{where}.parity")
            keys = ("token_agreement", "logits_max_abs", "confidence_max_abs") if "token_agreement" in parity else ("actions_max_abs",)
            for key in keys:
                need(_is_number(parity.get(key)), f"{where}.parity.{key}", "a number", parity.get(key, MISSING))
            need(parity.get("token_agreement_vs_fp32_eager") is None or _is_number(parity["token_agreement_vs_fp32_eager"]),
                 f"{where}.parity.token_agreement_vs_fp32_eager", "null or a number", parity.get("token_agreement_vs_fp32_eager"))
    return manifest


def _is_int(value: object, low: int = 0) -> bool:
    """An int (not a bool) in low..LARGEST_INT."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= LARGEST_INT


def _is_number(value: object) -> bool:
    """A float (inf and nan included) or an int (not a bool) of at most LARGEST_INT in size."""
    return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool) and abs(value) <= LARGEST_INT)


def _shown(value: object) -> str:
    """A short repr of a found value for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


GATE_FIELDS = ("tau", "mode", "statistic", "min_steps")  # what a manifest's or calibration's "gate" object must hold
GATE_OPTIONAL = {"max_steps": None, "layers": None}  # and what it may hold (absent in files written before it existed)


def gate_fields(data: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """The gate's fields of a manifest or calibration.json: its "gate" object, or for files written before gates
    had modes, their "tau" and "gate_statistic" (a whole-chunk gate). `rsd.runtime.gate.Gate` validates them."""
    if "gate" in data:
        gate = data["gate"]
        if not isinstance(gate, dict) or not set(GATE_FIELDS) <= set(gate):
            raise CheckpointError(f"{source}: expected \"gate\" to be an object with {', '.join(GATE_FIELDS)}, got {_shown(gate)}.")
        return {**GATE_OPTIONAL, **gate}
    if "tau" not in data or "gate_statistic" not in data:
        raise CheckpointError(f"{source}: expected a \"gate\" object (or the older \"tau\" and \"gate_statistic\"), found neither. "
                              "Re-run `rsd calibrate` or `rsd export-draft`.")
    return {"tau": data["tau"], "mode": "chunk", "statistic": data["gate_statistic"], "min_steps": 1, **GATE_OPTIONAL}


def gate_steps_text(gate: dict[str, Any]) -> str:
    """How many leading steps a prefix gate accepts, e.g. ", at least 4 steps" or ", 4 steps" ("" for a chunk gate)."""
    if gate["mode"] != "prefix":
        return ""
    low, high = gate["min_steps"], gate.get("max_steps")
    return f", {low} steps" if high == low else f", at least {low} steps" + ("" if high is None else f", at most {high}")


def describe_gate(gate: dict[str, Any]) -> str:
    """One line for a gate object, e.g. "prefix gate, tau 0.6200 on the step confidence, at least 4 steps"."""
    tau = float(gate["tau"])
    tau_text = "inf (never accept)" if math.isinf(tau) else f"{tau:.4f}"
    layers = gate.get("layers")
    read = "" if layers is None else f" of the coarsest {layers} layer{'s' if layers > 1 else ''}"
    return f"{gate['mode']} gate, tau {tau_text} on the {gate['statistic']} confidence{read}{gate_steps_text(gate)}"


def format_manifest(manifest: dict[str, Any]) -> str:
    """A readable summary of a bundle manifest (what `rsd inspect BUNDLE` prints)."""
    shapes = manifest["shapes"]
    gate = gate_fields(manifest, "manifest.json")
    lines = [
        f"bundle (format {manifest['format_version']}, rsd {manifest['rsd_version']}, created {manifest['created']})",
        f"main model fingerprint: {manifest['main_fingerprint']}",
        f"exit layer {manifest['exit_layer']}; {describe_gate(gate)}"
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
