"""Artifact files (safetensors + JSON manifest, hashes, strict keys) and normalisation statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rsd.data.stats import (
    ActionStats,
    DatasetStatistics,
    normalize,
    read_dataset_statistics,
    unnormalize,
    write_dataset_statistics,
)
from rsd.errors import CheckpointError, DataError, ShapeError
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


def test_statistics_normalise_round_trip_and_clip():
    rng = np.random.default_rng(0)
    values = rng.uniform(-2, 3, size=(1000, 4))
    stats = ActionStats.from_actions(values)
    assert np.allclose(stats.q01, np.quantile(values, 0.01, axis=0))
    inside = torch.tensor([[0.0, 0.5, 1.0, 2.0]])
    norm, clipped = normalize(inside, stats, warn=False)
    assert clipped == 0 and norm.abs().max() <= 1.0
    assert torch.allclose(unnormalize(norm, stats), inside, atol=1e-5)
    with pytest.warns(UserWarning, match="clipped"):
        norm, clipped = normalize(torch.tensor([[10.0, 0.0, 0.0, 0.0]]), stats)
    assert clipped == 1 and norm[0, 0] == 1.0
    with pytest.raises(ShapeError):
        normalize(torch.zeros(1, 3), stats)


def test_statistics_file_round_trip_and_key(tmp_path):
    stats = DatasetStatistics(action=ActionStats.from_actions(np.eye(3)), num_transitions=3, num_trajectories=1)
    path = tmp_path / "dataset_statistics.json"
    write_dataset_statistics(path, {"a": stats, "b": stats})
    assert read_dataset_statistics(path, "a") == stats
    with pytest.raises(DataError, match="name the dataset key"):
        read_dataset_statistics(path)
    with pytest.raises(DataError, match="expected statistics key 'c'"):
        read_dataset_statistics(path, "c")
    with pytest.raises(DataError):
        ActionStats.from_actions(np.array([[np.nan, 1.0]]))
