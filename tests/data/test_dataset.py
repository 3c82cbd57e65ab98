"""Action chunks, the frame dataset, the split by episode and q01/q99 statistics."""

from __future__ import annotations

import numpy as np
import pytest

from rsd.data.chunks import chunk_actions, split_episodes
from rsd.data.dataset import Episode, FrameDataset, compute_statistics
from rsd.errors import DataError, ShapeError


def make_episode(episode_id: int, steps: int, offset: float = 0.0) -> Episode:
    """An episode whose action at step t is `offset + t` in every dimension."""
    actions = (offset + np.arange(steps, dtype=np.float32))[:, None].repeat(7, axis=1)
    frames = np.full((steps, 8, 8, 3), episode_id, dtype=np.uint8)
    return Episode(episode_id, f"task {episode_id}", actions, {"agentview": frames}, np.zeros((steps, 8), dtype=np.float32))


def test_chunk_actions_pads_the_tail_with_the_last_action():
    chunks = chunk_actions(np.arange(5, dtype=np.float32)[:, None], chunk_len=3)
    assert chunks.shape == (5, 3, 1)
    assert chunks[:, :, 0].tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4], [4, 4, 4]]


def test_chunks_never_cross_episodes():
    dataset = FrameDataset([make_episode(0, 4), make_episode(1, 3, offset=100.0)], chunk_len=8)
    assert len(dataset) == 7
    last_of_first = dataset.batch([3])
    assert (last_of_first.actions == 3.0).all()  # padded with episode 0's last action, not episode 1's first
    first_of_second = dataset.batch([4]).actions[0, :, 0]
    assert first_of_second.tolist() == [100, 101, 102, 102, 102, 102, 102, 102]


def test_frame_batch_shapes():
    dataset = FrameDataset([make_episode(0, 4), make_episode(1, 6)], chunk_len=8)
    batch = dataset.batch([0, 5, 9])
    assert batch.images.shape == (3, 1, 8, 8, 3) and batch.images.dtype == np.uint8
    assert batch.actions.shape == (3, 8, 7) and batch.actions.dtype == np.float32
    assert batch.proprio.shape == (3, 8)
    assert batch.episode_ids.tolist() == [0, 1, 1] and batch.frame_indices.tolist() == [0, 1, 5]
    assert batch.instructions == ["task 0", "task 1", "task 1"]
    assert dataset.all_actions().shape == (10, 8, 7)
    with pytest.raises(DataError, match="rows"):
        dataset.batch([10])


def test_object_states_travel_with_their_frames():
    episodes = [make_episode(0, 4), make_episode(1, 6)]
    for episode in episodes:  # the state at step t is (episode id, t)
        episode.object_state = np.stack([np.full(len(episode), episode.episode_id), np.arange(len(episode))], axis=1).astype(np.float32)
    dataset = FrameDataset(episodes, chunk_len=8)
    assert dataset.all_object_states()[[0, 5, 9]].tolist() == [[0, 0], [1, 1], [1, 5]]  # indexed by the rows `batch` takes
    assert dataset.batch([0, 5, 9]).frame_indices.tolist() == [0, 1, 5]
    assert dataset.all_object_states().shape == (10, 2) and FrameDataset([make_episode(2, 3)], 8).all_object_states() is None
    with pytest.raises(DataError, match="object_state in every episode or in none"):
        FrameDataset([episodes[0], make_episode(2, 3)], chunk_len=8)
    wider = make_episode(3, 3)
    wider.object_state = np.zeros((3, 5), dtype=np.float32)
    with pytest.raises(DataError, match="one width"):
        FrameDataset([episodes[0], wider], chunk_len=8)
    with pytest.raises(ShapeError, match="object_state"):
        Episode(4, "task", np.zeros((3, 7), np.float32), {"agentview": np.zeros((3, 8, 8, 3), np.uint8)}, None, np.zeros((2, 4), np.float32))


def test_split_episodes_is_disjoint_and_deterministic():
    ids = list(range(20))
    train, val = split_episodes(ids, val_fraction=0.2, seed=3)
    assert set(train).isdisjoint(val) and sorted(train + val) == ids and len(val) == 4
    assert (train, val) == split_episodes(ids, val_fraction=0.2, seed=3)
    assert val != split_episodes(ids, val_fraction=0.2, seed=4)[1]
    with pytest.raises(DataError):
        split_episodes([5], val_fraction=0.5, seed=0)


def test_compute_statistics_quantiles():
    stats = compute_statistics([make_episode(0, 101)])
    assert stats.num_transitions == 101 and stats.num_trajectories == 1
    assert np.allclose(stats.action.q01, 1.0) and np.allclose(stats.action.q99, 99.0)
    assert stats.action.mask == (True,) * 7
    assert compute_statistics([make_episode(0, 101)], gripper_normalized=False).action.mask[-1] is False
    assert stats.proprio is not None and stats.proprio.dim == 8
