"""Normalisation statistics: q01/q99 round trip and clipping, the OpenVLA-layout file and its keys."""

from __future__ import annotations

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
from rsd.errors import DataError, ShapeError


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
