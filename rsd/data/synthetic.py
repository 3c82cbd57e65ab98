"""A documented smooth synthetic action set, for checking the tokenizer without any robot data.

Each episode is a 7-D trajectory like a LIBERO end-effector command stream: the xyz and rotation deltas are
sums of three sinusoids with random amplitude, frequency (0.02-0.15 cycles per step) and phase, scaled to
about ±0.5, and the gripper is ±1 with one to three switches at random steps. It is smooth at the scale of
an 8-step chunk, which is what the tokenizer's acceptance figure (val MSE ≤ 1e-3) is stated for.

Usage:
    episodes = synthetic_action_episodes(num_episodes=200, seed=0)        # list of [T, 7] arrays
    rsd synthetic-actions --episodes 200 --out runs/synthetic_actions.npz
"""

from __future__ import annotations

import numpy as np


def synthetic_action_episodes(num_episodes: int = 200, steps: tuple[int, int] = (80, 160), action_dim: int = 7, seed: int = 0) -> list[np.ndarray]:
    """Smooth random action episodes `[T, A]` (T uniform in `steps`); the last dimension is a ±1 gripper."""
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(num_episodes):
        length = int(rng.integers(steps[0], steps[1] + 1))
        t = np.arange(length)[:, None]
        amplitude = rng.uniform(0.05, 0.25, size=(3, action_dim - 1))
        frequency = rng.uniform(0.02, 0.15, size=(3, action_dim - 1))
        phase = rng.uniform(0, 2 * np.pi, size=(3, action_dim - 1))
        motion = sum(amplitude[i] * np.sin(2 * np.pi * frequency[i] * t + phase[i]) for i in range(3))
        switches = np.sort(rng.choice(np.arange(5, length - 5), size=int(rng.integers(1, 4)), replace=False))
        gripper = np.where(np.searchsorted(switches, np.arange(length), side="right") % 2 == 0, -1.0, 1.0)
        episodes.append(np.concatenate([motion, gripper[:, None]], axis=1).astype(np.float32))
    return episodes
