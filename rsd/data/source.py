"""A demonstration file together with how to read it: cameras, proprio keys, image size, image convention, instruction.

Files written by other tools (robomimic, LIBERO, a user's own h5py script) differ from rsd's own in what they
record: which cameras and proprio keys exist, the frame size, and whether frames are stored upside down (robosuite
renders with OpenGL's convention). `DataSource` names the choices instead of guessing them. It is a path-like
object (`os.fspath` gives the file), so every reader that takes a data path takes a `DataSource` too, and
`rsd.data.hdf5.read_demos` applies its choices. The same choices can live in a small per-dataset JSON file
(`--data-config`), e.g. `{"cameras": ["agentview"], "proprio_keys": ["ee_pos", "gripper_states"],
"image_convention": "opengl", "image_size": 64, "instruction": "lift the cube"}`.

Usage:
    source = DataSource("lift.hdf5", cameras=("agentview",), image_convention="opengl", image_size=64)
    episodes = read_demos(source)
    source = DataSource.from_config("lift.hdf5", "lift.rsd.json")
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from rsd.errors import ConfigError

IMAGE_CONVENTIONS = ("opengl", "opencv")  # "opengl": stored upside down (robosuite), rotated 180° on reading; "opencv": upright


@dataclass(frozen=True)
class DataSource:
    """A demonstration file and the choices for reading it; None everywhere means "as the file says"."""

    path: str  # the HDF5 demonstration file
    cameras: tuple[str, ...] | None = None  # camera names to load (`agentview` for obs/agentview_rgb); None: every camera
    proprio_keys: tuple[str, ...] | None = None  # obs datasets concatenated into proprio; (): none; None: LIBERO's default keys
    image_size: int | None = None  # resize frames to image_size × image_size; None: as stored
    image_convention: str | None = None  # "opengl" or "opencv"; None: the file's macros_image_convention attr (refused if absent)
    instruction: str | None = None  # the instruction of every demo (files without one, e.g. robomimic's); None: the file's own

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            raise ConfigError(f"DataSource.path: expected a file path, got {self.path!r}.")
        object.__setattr__(self, "path", str(self.path))
        for name in ("cameras", "proprio_keys"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"DataSource.{name}: expected a list of non-empty key names or None, got {value!r}.")
            object.__setattr__(self, name, tuple(value))
        if self.cameras == ():
            raise ConfigError("DataSource.cameras: expected at least one camera name, or None for every camera, got none.")
        if self.image_size is not None and (not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size < 8):
            raise ConfigError(f"DataSource.image_size: expected an int >= 8 or None, got {self.image_size!r}.")
        if self.instruction is not None and (not isinstance(self.instruction, str) or not self.instruction.strip()):
            raise ConfigError(f"DataSource.instruction: expected a non-empty string or None, got {self.instruction!r}.")
        if self.image_convention is not None and self.image_convention not in IMAGE_CONVENTIONS:
            raise ConfigError(f"DataSource.image_convention: expected one of {list(IMAGE_CONVENTIONS)} or None, got {self.image_convention!r}.")

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    @classmethod
    def from_config(cls, path: str | Path, config: str | Path, **overrides: Any) -> DataSource:
        """The choices of a per-dataset JSON file for `path`; `overrides` that are not None replace them."""
        try:
            data = json.loads(Path(config).read_bytes())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"--data-config {config}: expected a readable JSON object, got an error: {error}.") from error
        names = {f.name for f in fields(cls)} - {"path"}
        if not isinstance(data, dict) or set(data) - names:
            unknown = sorted(set(data) - names) if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"--data-config {config}: expected a JSON object with keys among {sorted(names)}, got {unknown}.")
        source = cls(str(path), **data)
        return replace(source, **{k: v for k, v in overrides.items() if v is not None})


def as_source(data: str | Path | DataSource) -> DataSource:
    """`data` as a DataSource (a bare path reads everything as the file says)."""
    return data if isinstance(data, DataSource) else DataSource(str(data))
