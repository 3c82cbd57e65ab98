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


@pytest.mark.parametrize(("name", "content"), [("empty.npz", b""), ("garbage.npz", b"PK\x03\x04 not a zip"), ("text.npz", b"1,2,3\n"),
                                               ("empty.hdf5", b""), ("garbage.h5", b"\x89HDF\r\n\x1a\n truncated")])
def test_unreadable_action_files_are_data_errors(tmp_path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=name):
        load_action_episodes(tmp_path / name)


def test_single_array_and_pickled_npz_are_refused(tmp_path) -> None:
    np.save(tmp_path / "one.npy", np.zeros((4, 7)))
    (tmp_path / "one.npz").write_bytes((tmp_path / "one.npy").read_bytes())
    with pytest.raises(DataError, match="single .npy array"):
        load_action_episodes(tmp_path / "one.npz")
    np.savez(tmp_path / "objects.npz", actions=np.array([{"a": 1}], dtype=object), episode_ends=np.array([1]))
    with pytest.raises(DataError, match="objects.npz"):
        load_action_episodes(tmp_path / "objects.npz")
