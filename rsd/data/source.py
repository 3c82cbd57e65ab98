"""Where training data comes from: one description of a data source and its key mapping, one reader for all formats.

`DataSource` names a path and how its keys map onto rsd's Episode (cameras, proprio, actions, instruction) and
how frames are prepared (resize, image convention) — the choices a file written by another tool (robomimic,
LIBERO, LeRobot, a user's own h5py script) may not record, named instead of guessed. `read_episodes(source)`
dispatches on what the path is: a LeRobotDataset folder (`meta/info.json`; `rsd.data.lerobot`) or a
robomimic/LIBERO HDF5 file (`rsd.data.hdf5.read_demos`). Key names are the format's own: LeRobot features
(`observation.images.wrist` or just `wrist`, `observation.state`, `action`), HDF5 obs datasets (`agentview` for
`obs/agentview_rgb` or robomimic's `obs/agentview_image`, `ee_pos`, ...). The same choices can live in a small
per-dataset JSON file (`DataSource.from_config`, `--data-config`), e.g. `{"cameras": ["agentview"],
"proprio_keys": ["ee_pos", "gripper_states"], "image_convention": "opengl", "image_size": 64, "instruction": "lift the cube"}`.

Usage:
    source = DataSource("data/libero_lerobot", cameras=("image",), image_size=64)
    episodes = read_episodes(source)                       # list[Episode]
    stats = source_statistics(source)                      # the dataset's own q01/q99, or None
    source = DataSource.from_config("lift.hdf5", "lift.rsd.json", image_size=64)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsd.data.actions import load_action_episodes
from rsd.data.dataset import Episode
from rsd.data.hdf5 import IMAGE_CONVENTIONS, read_demos
from rsd.data.lerobot import is_lerobot_dataset, read_lerobot, read_lerobot_actions, read_lerobot_statistics
from rsd.data.stats import DatasetStatistics
from rsd.errors import ConfigError, DataError
from rsd.io import sha256_file

log = logging.getLogger(__name__)

STATISTICS = ("dataset", "train")
FORMATS = ("lerobot", "hdf5", "npz")
MIN_IMAGE_SIZE = 8


@dataclass(frozen=True)
class DataSource:
    """A dataset path and the choices for reading it; None everywhere means "as the dataset says"."""

    path: str  # LeRobotDataset folder, robomimic/LIBERO HDF5 file, or (actions only) NPZ file
    cameras: tuple[str, ...] | None = None  # camera names/keys to load, in any order (None: every camera)
    proprio_keys: tuple[str, ...] | None = None  # keys concatenated into proprio (None: the format's default; (): none)
    image_size: int | None = None  # resize frames to image_size x image_size (Lanczos); None: as stored
    image_convention: str | None = None  # "opengl": stored upside down, rotated 180°; "opencv": upright; None: the file says
    instruction: str | None = None  # None: the dataset's own (LeRobot task, HDF5 attr); text: this for every episode
    action_key: str | None = None  # action key (None: "action" for LeRobot, "actions" for HDF5)
    statistics: str = "dataset"  # "dataset": the dataset's own q01/q99 when it has them; "train": from the training episodes

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            raise ConfigError(f"DataSource.path: expected a file or folder path, got {self.path!r}.")
        object.__setattr__(self, "path", str(self.path))
        for name in ("cameras", "proprio_keys"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                    raise ConfigError(f"DataSource.{name}: expected a list of non-empty key names or None, got {value!r}.")
                object.__setattr__(self, name, tuple(value))
        if self.cameras == ():
            raise ConfigError("DataSource.cameras: expected at least one camera name, or None for every camera, got none.")
        if self.action_key is not None and (not isinstance(self.action_key, str) or not self.action_key):
            raise ConfigError(f"DataSource.action_key: expected a key name or None, got {self.action_key!r}.")
        if self.instruction is not None and (not isinstance(self.instruction, str) or not self.instruction.strip()):
            raise ConfigError(f"DataSource.instruction: expected a non-empty string or None, got {self.instruction!r}.")
        if self.image_size is not None and (not isinstance(self.image_size, int) or isinstance(self.image_size, bool)
                                            or self.image_size < MIN_IMAGE_SIZE):
            raise ConfigError(f"DataSource.image_size: expected an int >= {MIN_IMAGE_SIZE} or None, got {self.image_size!r}.")
        if self.image_convention is not None and self.image_convention not in IMAGE_CONVENTIONS:
            raise ConfigError(f"DataSource.image_convention: expected one of {list(IMAGE_CONVENTIONS)} or None, got {self.image_convention!r}.")
        if self.statistics not in STATISTICS:
            raise ConfigError(f"DataSource.statistics: expected one of {list(STATISTICS)}, got {self.statistics!r}.")

    @classmethod
    def from_config(cls, path: str | Path, config: str | Path, **overrides: Any) -> DataSource:
        """The choices of a per-dataset JSON file for `path`; `overrides` that are not None replace them."""
        try:
            data = json.loads(Path(config).read_bytes())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"--data-config {config}: expected a readable JSON object, got an error: {error}.") from error
        names = {f.name for f in dataclasses.fields(cls)} - {"path"}
        if not isinstance(data, dict) or set(data) - names:
            unknown = sorted(set(data) - names) if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"--data-config {config}: expected a JSON object with keys among {sorted(names)}, got {unknown}.")
        return cls(str(path), **{**data, **{k: v for k, v in overrides.items() if v is not None}})

    @property
    def format(self) -> str:
        """"lerobot" (a folder with meta/info.json), "npz" (a .npz file) or "hdf5" (any other file); a DataError otherwise."""
        path = Path(self.path)
        if path.is_dir():
            if not is_lerobot_dataset(path):
                raise DataError(f"{path}: expected a LeRobotDataset folder (with meta/info.json) or an HDF5 file, got a folder without meta/info.json.")
            return "lerobot"
        if not path.is_file():
            raise DataError(f"{path}: expected a LeRobotDataset folder or an HDF5 file, got no such file or folder.")
        return "npz" if path.suffix == ".npz" else "hdf5"

    def is_default_mapping(self) -> bool:
        """True when every field but `path` has its default value."""
        return all(getattr(self, f.name) == f.default for f in dataclasses.fields(self) if f.name != "path")


def as_source(data: str | Path | DataSource) -> DataSource:
    """`data` as a DataSource (a bare path gets the default mapping: everything as the dataset says)."""
    return data if isinstance(data, DataSource) else DataSource(str(data))


def read_episodes(data: str | Path | DataSource) -> list[Episode]:
    """Every episode of a LeRobotDataset folder or an HDF5 demo file, mapped and prepared as `data` says."""
    source = as_source(data)
    kind = source.format
    if kind == "npz":
        raise DataError(f"{source.path}: expected demonstrations with frames (LeRobot folder or HDF5), got an actions-only NPZ file.")
    if kind == "hdf5":
        return read_demos(source.path, source.cameras, source.proprio_keys, source.action_key or "actions", source.image_convention,
                          source.instruction, source.image_size)
    if source.image_convention is None:
        log.info("%s: LeRobot frames are taken as stored (upright); pass image_convention='opengl' to rotate them 180°.", source.path)
    episodes = read_lerobot(source.path, source.cameras, source.proprio_keys, source.action_key or "action", source.image_size)
    for episode in episodes:
        if source.image_convention == "opengl":
            episode.images = {c: np.ascontiguousarray(f[:, ::-1, ::-1]) for c, f in episode.images.items()}
        if source.instruction is not None:
            episode.instruction = source.instruction
    return episodes


def read_action_episodes(data: str | Path | DataSource) -> tuple[list[np.ndarray], list[int]]:
    """Per-episode actions `[T_i, A]` and episode ids, reading no frames (LeRobot parquet, HDF5 or NPZ)."""
    source = as_source(data)
    if source.format == "lerobot":
        return read_lerobot_actions(source.path, source.action_key or "action")
    if source.action_key not in (None, "actions"):
        episodes = read_episodes(source)
        return [e.actions for e in episodes], [e.episode_id for e in episodes]
    return load_action_episodes(source.path)


def source_statistics(data: str | Path | DataSource) -> DatasetStatistics | None:
    """The dataset's own q01/q99 statistics (LeRobot `meta/stats.json`), or None when the training episodes must supply them.

    None for `statistics="train"`, for HDF5/NPZ files (they carry none), and when the LeRobot file lacks
    q01/q99 (logged: the statistics are then computed from the training episodes, never taken from min/max).
    """
    source = as_source(data)
    if source.statistics == "train" or source.format != "lerobot":
        return None
    stats = read_lerobot_statistics(source.path, source.proprio_keys, source.action_key or "action")
    if stats is not None:
        log.info("%s: using the dataset's own q01/q99 statistics (meta/stats.json, all %d episodes).", source.path, stats.num_trajectories)
    return stats


def source_fingerprint(data: str | Path | DataSource) -> str:
    """sha256 identifying the data and its mapping: the file's own sha256 for an HDF5 file with the default mapping,
    else a hash of the mapping and of every data file's sha256 (a LeRobot folder's meta/, data/, videos/, by relative path)."""
    source = as_source(data)
    path = Path(source.path)
    if source.format != "lerobot" and source.is_default_mapping():
        return sha256_file(path)
    if path.is_dir():
        found = sorted(p for top in ("meta", "data", "videos") for p in (path / top).rglob("*") if p.is_file())
        files = {str(p.relative_to(path)): sha256_file(p) for p in found}
    else:
        files = {path.name: sha256_file(path)}
    mapping = {k: v for k, v in dataclasses.asdict(source).items() if k != "path"}
    return hashlib.sha256(json.dumps({"files": files, "mapping": mapping}, sort_keys=True).encode()).hexdigest()
