"""Artifact files: safetensors weights beside a JSON manifest, hashing, and strict state-dict checks.

Usage:
    save_artifact(out_dir, "draft", module.state_dict(), {"config": to_dict(cfg)}, kind="draft")
    tensors, meta = load_artifact(out_dir, "draft", kind="draft")
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rsd.errors import CheckpointError

FORMAT_VERSION = 1


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_artifact(directory: str | Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], kind: str) -> Path:
    """Write `name.safetensors` and `name.json` (meta + kind, format version, weights sha256) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(weights))
    manifest = {"kind": kind, "format_version": FORMAT_VERSION, **meta, "weights_sha256": sha256_file(weights)}
    (directory / f"{name}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return weights


def read_manifest(directory: str | Path, name: str, kind: str) -> dict[str, Any]:
    """Read `name.json`, checking it exists, is of `kind` and of this format version."""
    path = Path(directory) / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: expected a {kind} manifest, found no file. Point at a folder written by rsd.")
    meta = json.loads(path.read_text())
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path}: expected kind {kind!r}, got {meta.get('kind')!r}.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: expected format version {FORMAT_VERSION}, got {meta.get('format_version')!r}. "
            "Re-create it with this version of rsd."
        )
    return meta


def load_artifact(directory: str | Path, name: str, kind: str, verify_hash: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load the tensors and the manifest written by `save_artifact`, verifying the weights' sha256."""
    meta = read_manifest(directory, name, kind)
    weights = Path(directory) / f"{name}.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights}: expected the {kind} weights beside {name}.json, found no file.")
    if verify_hash:
        found = sha256_file(weights)
        if found != meta.get("weights_sha256"):
            raise CheckpointError(f"{weights}: expected sha256 {meta.get('weights_sha256')}, got {found}; the file changed after it was written.")
    return load_file(str(weights)), meta


def check_state_dict(
    module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path
) -> None:
    """Refuse `tensors` unless they hold exactly the module's keys with the module's shapes."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: state dict does not match {type(module).__name__}: missing keys {missing}, unexpected keys {unexpected}."
        )
    for key, value in expected.items():
        if tuple(value.shape) != tuple(tensors[key].shape):
            raise CheckpointError(
                f"{source}: key {key!r} expected shape {tuple(value.shape)}, got {tuple(tensors[key].shape)}."
            )


def load_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Check `tensors` against `module` (`check_state_dict`) and assign them in place."""
    check_state_dict(module, tensors, source)
    module.load_state_dict(tensors, strict=True, assign=True)
