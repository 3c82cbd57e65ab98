"""Action-only episode files: what the tokenizer trains on.

Two on-disk formats are read:

- **NPZ** (`.npz`): `actions` float `[N, A]` (every step of every episode, in order) and `episode_ends` int
  `[E]`, the exclusive end index of each episode (so episode i is `actions[ends[i-1]:ends[i]]`), optionally
  `episode_ids` int `[E]` (default 0..E-1). `write_action_episodes` writes it.
- **HDF5** in the robomimic/LIBERO layout (`data/demo_<i>/actions [T, A]`): only the actions are read, so a
  large demo file is not loaded into memory.

Usage:
    episodes, ids = load_action_episodes("runs/synthetic_actions.npz")     # list of [T, A] arrays
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rsd.data.hdf5 import (
    LIBERO_ACTION_DIM,
    data_group,
    demo_names,
    libero_gripper_to_policy,
    open_hdf5,
    recorded_by_libero,
)
from rsd.errors import DataError
from rsd.io import atomic_file

HDF5_SUFFIXES = (".hdf5", ".h5")


def write_action_episodes(path: str | Path, episodes: Sequence[np.ndarray], episode_ids: Sequence[int] | None = None) -> None:
    """Write per-episode actions `[T_i, A]` as the NPZ format above (atomically; `.npz` is added if missing, as numpy does)."""
    if not episodes:
        raise DataError("write_action_episodes: expected at least one episode, got none.")
    ends = np.cumsum([len(e) for e in episodes])
    ids = np.arange(len(episodes)) if episode_ids is None else np.asarray(episode_ids)
    with atomic_file(Path(path).with_suffix(".npz")) as temporary:
        np.savez(temporary, actions=np.concatenate(episodes).astype(np.float32), episode_ends=ends.astype(np.int64),
                 episode_ids=ids.astype(np.int64))


def load_action_episodes(path: str | Path) -> tuple[list[np.ndarray], list[int]]:
    """Per-episode actions `[T_i, A]` and episode ids from an NPZ or LIBERO-layout HDF5 file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: expected an action file (.npz or .hdf5), found nothing.")
    episodes, ids = _read_hdf5(path) if path.suffix in HDF5_SUFFIXES else _read_npz(path)
    dims = {e.shape[1] for e in episodes}
    if len(dims) != 1:
        raise DataError(f"{path}: expected one action size in every episode, got {sorted(dims)}.")
    for episode_id, actions in zip(ids, episodes, strict=False):
        if not np.isfinite(actions).all():
            raise DataError(f"{path}: episode {episode_id} holds NaN or inf actions.")
    return episodes, ids


def _read_npz(path: Path) -> tuple[list[np.ndarray], list[int]]:
    try:
        loaded = np.load(path, allow_pickle=False)
        arrays = {k: loaded[k] for k in ("actions", "episode_ends", "episode_ids") if k in loaded} if hasattr(loaded, "files") else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: expected an NPZ file of arrays (or an HDF5 file named .hdf5/.h5), got one numpy cannot read "
                        f"({type(error).__name__}: {error}).") from error
    if arrays is None:
        raise DataError(f"{path}: expected an NPZ archive with 'actions' and 'episode_ends', got a single .npy array.")
    loaded.close()
    missing = [k for k in ("actions", "episode_ends") if k not in arrays]
    if missing:
        raise DataError(f"{path}: expected arrays 'actions' [N, A] and 'episode_ends' [E], missing {missing}.")
    actions = arrays["actions"]
    if not np.issubdtype(actions.dtype, np.number) or not np.issubdtype(arrays["episode_ends"].dtype, np.integer):
        raise DataError(f"{path}: expected numeric 'actions' and integer 'episode_ends', got {actions.dtype} and {arrays['episode_ends'].dtype}.")
    ends = arrays["episode_ends"].astype(np.int64)
    ids = arrays["episode_ids"].astype(np.int64) if "episode_ids" in arrays else np.arange(len(ends))
    if actions.ndim != 2:
        raise DataError(f"{path}: expected 'actions' [N, A], got shape {actions.shape}.")
    if ends.ndim != 1 or len(ends) == 0 or ends[-1] != len(actions) or (np.diff(ends) <= 0).any() or ends[0] <= 0:
        raise DataError(f"{path}: expected 'episode_ends' increasing and ending at N={len(actions)}, got {ends.tolist()[:10]}...")
    if len(ids) != len(ends):
        raise DataError(f"{path}: expected {len(ends)} 'episode_ids', got {len(ids)}.")
    starts = np.concatenate([[0], ends[:-1]])
    return [actions[s:e].astype(np.float32) for s, e in zip(starts, ends, strict=False)], [int(i) for i in ids]


def _read_hdf5(path: Path) -> tuple[list[np.ndarray], list[int]]:
    with open_hdf5(path) as handle:
        data = data_group(path, handle)
        names = demo_names(path, data)
        episodes = []
        for name in names:
            if "actions" not in data[name]:
                raise DataError(f"{path}: data/{name} has no 'actions' dataset.")
            actions = data[name]["actions"][()]
            if actions.ndim != 2 or actions.shape[0] == 0:
                raise DataError(f"{path}: data/{name}/actions expected [T, A] with T > 0, got shape {actions.shape}.")
            episodes.append(actions.astype(np.float32))
        if recorded_by_libero(data) and episodes[0].shape[1] == LIBERO_ACTION_DIM:  # as `read_demos` reads them
            for actions in episodes:
                actions[:, -1] = libero_gripper_to_policy(actions[:, -1])
    return episodes, [int(n.split("_")[1]) for n in names]
