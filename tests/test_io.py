"""Artifact files: safetensors + JSON round trip, hash, kind and version checks, strict state-dict loading."""

from __future__ import annotations

import json

import pytest
import torch

from rsd.errors import CheckpointError
from rsd.io import load_artifact, load_strict, save_artifact


def test_artifact_round_trip_and_hash(tmp_path):
    layer = torch.nn.Linear(3, 2)
    save_artifact(tmp_path, "layer", layer.state_dict(), {"note": "x"}, kind="test")
    tensors, meta = load_artifact(tmp_path, "layer", kind="test")
    assert meta["note"] == "x" and torch.equal(tensors["weight"], layer.weight)
    data = bytearray((tmp_path / "layer.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "layer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_artifact(tmp_path, "layer", kind="test")


def test_artifact_kind_and_version_checked(tmp_path):
    save_artifact(tmp_path, "a", {"w": torch.zeros(1)}, {}, kind="test")
    with pytest.raises(CheckpointError, match="kind"):
        load_artifact(tmp_path, "a", kind="draft")
    manifest = json.loads((tmp_path / "a.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "a.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version"):
        load_artifact(tmp_path, "a", kind="test")


def test_load_strict_names_missing_and_unexpected_keys():
    layer = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match=r"missing keys \['bias'\].*unexpected keys \['extra'\]"):
        load_strict(layer, {"weight": torch.zeros(2, 3), "extra": torch.zeros(1)}, "mem")
    with pytest.raises(CheckpointError, match="expected shape"):
        load_strict(layer, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "mem")
