"""Action-only episode files (NPZ and LIBERO-layout HDF5) and the synthetic action set."""

from __future__ import annotations

import numpy as np
import pytest

from rsd.data.actions import load_action_episodes, write_action_episodes
from rsd.data.synthetic import synthetic_action_episodes
from rsd.errors import DataError


def test_action_file_formats(tmp_path) -> None:
    episodes = synthetic_action_episodes(3, seed=2)
    write_action_episodes(tmp_path / "a.npz", episodes, [5, 6, 7])
    loaded, ids = load_action_episodes(tmp_path / "a.npz")
    assert ids == [5, 6, 7] and all(np.array_equal(a, b) for a, b in zip(loaded, episodes, strict=False))
    np.savez(tmp_path / "bad.npz", actions=np.zeros((10, 7)), episode_ends=np.array([4, 9]))
    with pytest.raises(DataError, match="episode_ends"):
        load_action_episodes(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="found nothing"):
        load_action_episodes(tmp_path / "missing.npz")
