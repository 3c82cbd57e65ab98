"""`rsd convert`: demonstrations from rsd's HDF5 layout to a LeRobot v3.0 folder, and back.

HDF5 -> LeRobot keeps actions and proprio bit for bit (float32) and stores each camera as an MP4 stream
(`video="high"`: H.264 4:4:4 CRF 0, frames back within 1-2 grey levels; `video="lerobot"`: LeRobot's own AV1
setting, smaller and lossy). LeRobot -> HDF5 decodes the frames and writes rsd's LIBERO layout (`write_demos`),
so a dataset from the hub can be used by every tool that reads HDF5. Episodes are renumbered 0..N-1 going to
LeRobot (its episode table is indexed by position).

Usage:
    rsd convert --to lerobot --data runs/demo/demos.hdf5 --out runs/demo/lerobot
    rsd convert --to hdf5 --data runs/demo/lerobot --out runs/demo/from_lerobot.hdf5
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rsd.data.hdf5 import write_demos
from rsd.data.lerobot import write_lerobot
from rsd.data.source import DataSource, as_source, read_episodes
from rsd.data.video import VIDEO_SETTINGS
from rsd.errors import ConfigError
from rsd.io import refuse_existing_file

log = logging.getLogger(__name__)

TARGETS = ("lerobot", "hdf5")


def convert(data: str | Path | DataSource, out: str | Path, to: str, fps: int = 20, video: str = "high",
            robot_type: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Convert the demonstrations of `data` to format `to` ("lerobot" or "hdf5") at `out`; return a summary.

    `fps`: the frame rate recorded in the LeRobot metadata (HDF5 demos carry none; 20 Hz is LIBERO's and
    robosuite's control rate). `video`: a name in `rsd.data.video.VIDEO_SETTINGS`. An existing `out` is replaced only
    with `overwrite=True`, and only once the new one is complete (`rsd.io.staged_dir`, `rsd.io.atomic_file`).
    """
    if to not in TARGETS:
        raise ConfigError(f"convert --to: expected one of {list(TARGETS)}, got {to!r}.")
    if video not in VIDEO_SETTINGS:
        raise ConfigError(f"convert --video: expected one of {sorted(VIDEO_SETTINGS)}, got {video!r}.")
    if fps < 1:
        raise ConfigError(f"convert --fps: expected an int >= 1, got {fps}.")
    if to == "hdf5":
        refuse_existing_file(out, overwrite)
    source = as_source(data)
    episodes = read_episodes(source)
    if to == "lerobot":
        ids = [e.episode_id for e in episodes]
        if ids != list(range(len(ids))):
            log.info("convert: episode ids %s... become LeRobot episode_index 0..%d in the same order.", ids[:5], len(ids) - 1)
        summary = write_lerobot(out, episodes, fps=fps, video=VIDEO_SETTINGS[video], robot_type=robot_type, overwrite=overwrite)
        return {**summary, "out": str(out)}
    env_name = robot_type or Path(source.path).stem
    log.info("convert: %s written to %s with env name %r.", source.path, out, env_name)
    write_demos(out, episodes, env_name=env_name)  # env_kwargs stay empty: they are the options `make_env` gets
    return {"episodes": len(episodes), "frames": sum(len(e) for e in episodes), "out": str(out)}
