"""Action chunks inside episodes and the split by episode (docs/pitfalls.md #5).

A chunk is the H consecutive actions starting at a frame, never crossing into the next episode; near the
end of an episode the chunk is padded by repeating the episode's last action.

Usage:
    chunks = chunk_actions(actions, chunk_len=8)           # actions [T, A] -> [T, H, A]
    train_ids, val_ids = split_episodes(episode_ids, val_fraction=0.1, seed=0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rsd.errors import ConfigError, DataError, ShapeError


def chunk_actions(actions: np.ndarray, chunk_len: int) -> np.ndarray:
    """Every frame's chunk of one episode: `actions [T, A]` → `[T, H, A]`, the tail padded with the last action."""
    actions = np.asarray(actions)
    if actions.ndim != 2 or actions.shape[0] == 0:
        raise ShapeError(f"chunk_actions: expected one episode's actions [T, A] with T > 0, got shape {actions.shape}.")
    if chunk_len <= 0:
        raise ConfigError(f"chunk_actions.chunk_len: expected a positive int, got {chunk_len}.")
    steps = actions.shape[0]
    index = np.minimum(np.arange(steps)[:, None] + np.arange(chunk_len)[None, :], steps - 1)
    return actions[index]


def split_episodes(episode_ids: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split distinct episode ids into (train, validation) lists; validation gets at least one episode."""
    unique = sorted({int(e) for e in episode_ids})
    if len(unique) < 2:
        raise DataError(f"split_episodes: expected at least 2 episodes to split by episode, got {len(unique)}.")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"split_episodes.val_fraction: expected a float in (0, 1), got {val_fraction}.")
    order = np.random.default_rng(seed).permutation(unique)
    num_val = min(len(unique) - 1, max(1, round(len(unique) * val_fraction)))
    return sorted(int(e) for e in order[num_val:]), sorted(int(e) for e in order[:num_val])
