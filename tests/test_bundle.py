"""The bundle format on its own: the manifest written, read back, every listed file re-hashed."""

from __future__ import annotations

import json

import pytest

from rsd.bundle import BUNDLE_KIND, MANIFEST, file_entry, listed_files, read_manifest, verify_bundle, write_manifest
from rsd.errors import CheckpointError
from rsd.io import FORMAT_VERSION


def _bundle(tmp_path):
    (tmp_path / "draft.safetensors").write_bytes(b"weights")
    (tmp_path / "draft.onnx").write_bytes(b"graph")
    engine = {"name": "draft", "format": "onnx", "built": True, "files": [file_entry(tmp_path, tmp_path / "draft.onnx")]}
    manifest = {"kind": BUNDLE_KIND, "format_version": FORMAT_VERSION, "sources": [file_entry(tmp_path, tmp_path / "draft.safetensors")],
                "engines": [engine]}
    write_manifest(tmp_path, manifest)
    return manifest


def test_manifest_round_trip_and_verification(tmp_path) -> None:
    manifest = _bundle(tmp_path)
    assert read_manifest(tmp_path) == manifest == verify_bundle(tmp_path)
    assert [e["path"] for e in listed_files(manifest)] == ["draft.safetensors", "draft.onnx"]
    assert listed_files(manifest)[1]["bytes"] == len(b"graph")


def test_changed_missing_or_foreign_files_are_refused(tmp_path) -> None:
    _bundle(tmp_path)
    (tmp_path / "draft.onnx").write_bytes(b"graph!")
    with pytest.raises(CheckpointError, match="draft.onnx.*changed after export"):
        verify_bundle(tmp_path)
    (tmp_path / "draft.onnx").unlink()
    with pytest.raises(CheckpointError, match="lists this file"):
        verify_bundle(tmp_path)
    (tmp_path / f"{MANIFEST}.json").write_text(json.dumps({"kind": "draft", "format_version": FORMAT_VERSION}))
    with pytest.raises(CheckpointError, match="kind 'bundle'"):
        read_manifest(tmp_path)
