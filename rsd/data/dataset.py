"""Episodes and the frame dataset every training step reads: images, instruction, proprio, action chunk.

An episode may also carry the simulator's low-dim object state per step (robomimic's `obs/object`: where the
objects are). A camera-only policy never reads it; training can regress it from the policy's hidden state as an
auxiliary target (`PolicyTrainConfig.object_loss`), which tells the policy where to look long before the action
loss alone does.

`Episode` is one demonstration in memory (what `rsd.data.hdf5.read_demos` returns); `FrameDataset` indexes
every frame of every episode and returns batches with the frame's H-step action chunk (padded at the tail,
`rsd.data.chunks.chunk_actions`). Cameras are ordered by name so every step sees them in the same order.

Usage:
    episodes = read_demos("runs/demo/demos.hdf5")
    dataset = FrameDataset(episodes, chunk_len=8)
    batch = dataset.batch([0, 1, 2])        # batch.images uint8 [B, N, H, W, 3], batch.actions [B, H, A]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from rsd.data.chunks import chunk_actions
from rsd.data.stats import ActionStats, DatasetStatistics
from rsd.errors import DataError, ShapeError


@dataclass
class Episode:
    """One demonstration: per-step actions, camera frames and proprio, with its language instruction."""

    episode_id: int  # unique within a dataset file
    instruction: str  # the task's language instruction
    actions: np.ndarray  # [T, A] float32 actions as executed
    images: dict[str, np.ndarray]  # camera name -> uint8 frames [T, H, W, 3]
    proprio: np.ndarray | None = None  # [T, P] float32 proprioception, or None
    object_state: np.ndarray | None = None  # [T, S] float32 low-dim object state (training-time supervision only), or None

    def __post_init__(self) -> None:
        steps = self.actions.shape[0] if self.actions.ndim == 2 else -1
        if steps <= 0:
            raise ShapeError(f"episode {self.episode_id}: expected actions [T, A] with T > 0, got shape {self.actions.shape}.")
        if not np.isfinite(self.actions).all():
            step, dim = (int(i) for i in np.argwhere(~np.isfinite(self.actions))[0])
            raise DataError(f"episode {self.episode_id}: expected finite actions, got {self.actions[step, dim]} at step {step}, dim {dim}.")
        if not self.instruction or not self.instruction.strip():
            raise DataError(f"episode {self.episode_id}: expected a non-empty instruction, got {self.instruction!r}.")
        if not self.images:
            raise DataError(f"episode {self.episode_id}: expected at least one camera, got none.")
        for camera, frames in self.images.items():
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != steps or frames.shape[3] != 3:
                raise ShapeError(
                    f"episode {self.episode_id} camera {camera!r}: expected uint8 [{steps}, H, W, 3], got {frames.dtype} {frames.shape}."
                )
        for name, values in (("proprio", self.proprio), ("object_state", self.object_state)):
            if values is None:
                continue
            if values.ndim != 2 or values.shape[0] != steps:
                raise ShapeError(f"episode {self.episode_id}: expected {name} [{steps}, D], got shape {values.shape}.")
            if not np.isfinite(values).all():
                step, dim = (int(i) for i in np.argwhere(~np.isfinite(values))[0])
                raise DataError(f"episode {self.episode_id}: expected finite {name}, got {values[step, dim]} at step {step}, dim {dim}.")

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @property
    def cameras(self) -> list[str]:
        """Camera names in the fixed (sorted) order used everywhere."""
        return sorted(self.images)


@dataclass
class FrameBatch:
    """A batch of frames with their action chunks."""

    images: np.ndarray  # uint8 [B, N, H, W, 3] (N cameras in sorted name order)
    instructions: list[str]  # B instructions
    proprio: np.ndarray | None  # float32 [B, P] or None
    actions: np.ndarray  # float32 [B, H, A] the chunk starting at each frame
    episode_ids: np.ndarray  # int64 [B]
    frame_indices: np.ndarray  # int64 [B] index of the frame inside its episode


class FrameDataset:
    """Every frame of a list of episodes, with the H-step action chunk that starts at it."""

    def __init__(self, episodes: Sequence[Episode], chunk_len: int) -> None:
        if not episodes:
            raise DataError("FrameDataset: expected at least one episode, got none.")
        ids = [e.episode_id for e in episodes]
        if len(set(ids)) != len(ids):
            raise DataError(f"FrameDataset: expected unique episode ids, got duplicates in {ids}.")
        cameras = {tuple(e.cameras) for e in episodes}
        if len(cameras) != 1:
            raise DataError(f"FrameDataset: expected every episode to have the same cameras, got {sorted(cameras)}.")
        for name in ("proprio", "object_state"):
            if len({getattr(e, name) is not None for e in episodes}) != 1:
                raise DataError(f"FrameDataset: expected {name} in every episode or in none.")
            widths = {getattr(e, name).shape[1] for e in episodes if getattr(e, name) is not None}
            if len(widths) > 1:
                raise DataError(f"FrameDataset: expected {name} of one width in every episode, got widths {sorted(widths)}.")
        self.episodes = list(episodes)
        self.chunk_len = chunk_len
        self.cameras = list(next(iter(cameras)))
        self._chunks = [chunk_actions(e.actions, chunk_len).astype(np.float32) for e in self.episodes]
        self._owner = np.concatenate([np.full(len(e), i, dtype=np.int64) for i, e in enumerate(self.episodes)])
        self._frame = np.concatenate([np.arange(len(e), dtype=np.int64) for e in self.episodes])
        self.episode_ids = np.asarray(ids, dtype=np.int64)[self._owner]

    def __len__(self) -> int:
        return int(self._owner.shape[0])

    def all_actions(self) -> np.ndarray:
        """Every frame's action chunk `[N, H, A]` in frame order."""
        return np.concatenate(self._chunks)

    def all_object_states(self) -> np.ndarray | None:
        """Every frame's object state `[N, S]` in frame order (dataset rows index it), or None when the episodes record
        none. Training reads it once, standardised, rather than per batch."""
        if self.episodes[0].object_state is None:
            return None
        return np.concatenate([e.object_state for e in self.episodes]).astype(np.float32)

    def batch(self, rows: Iterable[int]) -> FrameBatch:
        """The frames at dataset rows `rows` with their chunks."""
        rows = np.asarray(list(rows), dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise DataError(f"FrameDataset.batch: expected rows in 0..{len(self) - 1}, got {rows.min()}..{rows.max()}.")
        owners, frames = self._owner[rows], self._frame[rows]
        images = np.stack([np.stack([self.episodes[o].images[c][f] for c in self.cameras]) for o, f in zip(owners, frames, strict=False)])
        proprio = None
        if self.episodes[0].proprio is not None:
            proprio = np.stack([self.episodes[o].proprio[f] for o, f in zip(owners, frames, strict=False)]).astype(np.float32)
        return FrameBatch(
            images=images,
            instructions=[self.episodes[o].instruction for o in owners],
            proprio=proprio,
            actions=np.stack([self._chunks[o][f] for o, f in zip(owners, frames, strict=False)]),
            episode_ids=self.episode_ids[rows],
            frame_indices=frames,
        )


def compute_statistics(episodes: Sequence[Episode], gripper_normalized: bool = True) -> DatasetStatistics:
    """q01/q99 statistics of the actions (and proprio) of `episodes`, OpenVLA's `dataset_statistics.json` entry."""
    if not episodes:
        raise DataError("compute_statistics: expected at least one episode, got none.")
    actions = np.concatenate([e.actions for e in episodes])
    mask = None if gripper_normalized else (True,) * (actions.shape[1] - 1) + (False,)
    proprio = None
    if episodes[0].proprio is not None:
        proprio = ActionStats.from_actions(np.concatenate([e.proprio for e in episodes]))
    return DatasetStatistics(
        action=ActionStats.from_actions(actions, mask),
        proprio=proprio,
        num_transitions=int(actions.shape[0]),
        num_trajectories=len(episodes),
    )
