"""Demonstration files in the robomimic/LIBERO HDF5 layout, so LIBERO's own datasets load unchanged.

Layout (LIBERO's `scripts/create_dataset.py`): group `data` with attrs `env_name`, `env_args` (JSON with
`env_name`, `env_kwargs`), `problem_info` (JSON with `language_instruction`), `bddl_file_name`, `num_demos`,
`total` (rsd adds `rsd_provenance`, below); one group `data/demo_<i>` per episode with attr `num_samples`, datasets `actions [T, A]`, `dones [T]`
(last = 1), `rewards [T]`, `obs/<camera>_rgb [T, H, W, 3]` uint8 and proprio `obs/ee_pos [T, 3]`,
`obs/ee_ori [T, 3]`, `obs/gripper_states [T, 2]` (`obs/joint_states` when present). The simulator's low-dim object
state, when recorded, is robomimic's `obs/object [T, S]` (`Episode.object_state`: training-time supervision only).

LIBERO stores one instruction per file (its files hold one task); tabletop files mix tasks, so each demo group
also carries an attr `language_instruction`, which the reader prefers. Files written by robosuite/LIBERO say
`macros_image_convention = "opengl"` (frames upside down): the reader rotates those frames by 180°, as the
simulator adapters (`rsd.envs.sim_common`) and OpenVLA's LIBERO datasets do, so training matches evaluation.
A file that does not record its convention (robomimic's, a user's own h5py script) is refused until the reader
is told (`DataSource.image_convention`, `--image-convention`): a guess would train a policy on mirror images of
what it sees in the loop. Likewise a file with only some of LIBERO's proprio keys is refused, naming the missing
ones, until `proprio_keys` says which to use (or none). `DataSource.image_size` resizes frames to the model's size.

Actions are read in the units the recording environment's `step` takes in rsd. rsd's own files store exactly
that (tabletop and robosuite: the controller's gripper -1 open / +1 close; `libero:*`: OpenVLA's LIBERO units,
gripper 1 open / 0 closed). Files LIBERO's own tools recorded (`recorded_by_libero`) store LIBERO's controller
command, gripper -1 open / +1 close, while rsd's LIBERO env takes OpenVLA's units (it maps them back for the
controller: `rsd.envs.sim_common.libero_env_action`, OpenVLA-OFT's protocol); their gripper is therefore mapped
to `(1 - g) / 2` on reading (-1 -> 1 open, +1 -> 0 closed), the inverse of that mapping, as OpenVLA's LIBERO data
transform does. Without it a policy trained on LIBERO's datasets would close the gripper where the demonstrator
opened it.

How the episodes were made is recorded beside them: `data.attrs["rsd_provenance"]` is a JSON list of records, one per
generating run, each naming the demo ids it produced (`first_demo`, `end_demo`) and its settings (seeds, DART noise,
the steering policy and its handover for recovery episodes); an aggregated file carries the earlier file's
records first. `read_provenance` returns the list (empty for files that do not say).

Usage:
    write_demos("runs/demo/demos.hdf5", episodes, env_name="tabletop")
    read_provenance("runs/demo/dagger.hdf5")   # [{"first_demo": 0, "end_demo": 1500, "noise": 0.1, ...}, {...}]
    episodes = read_demos("runs/demo/demos.hdf5")             # list[Episode], ordered by demo index
    episodes = read_demos("lift.hdf5", cameras=["agentview"], image_convention="opengl", image_size=64)
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from rsd.data.dataset import Episode
from rsd.data.video import resize_frames
from rsd.errors import DataError
from rsd.io import atomic_file

PROPRIO_KEYS = ("ee_pos", "ee_ori", "gripper_states")  # LIBERO's proprio, 3 + 3 + 2 = 8 dims
PROPRIO_SPLIT = {"ee_pos": slice(0, 3), "ee_ori": slice(3, 6), "gripper_states": slice(6, 8)}
OBJECT_KEY = "object"  # robomimic's low-dim object state, obs/object [T, S]
CAMERA_SUFFIXES = ("_rgb", "_image")  # LIBERO's obs/<camera>_rgb, robomimic's obs/<camera>_image
DEMO_NAME = re.compile(r"demo_(\d+)")
IMAGE_CONVENTIONS = ("opengl", "opencv")  # "opengl": stored upside down (robosuite), rotated 180° on reading; "opencv": upright
LIBERO_ACTION_DIM = 7  # xyz delta, axis-angle delta, gripper

log = logging.getLogger(__name__)


def write_demos(
    path: str | Path,
    episodes: Sequence[Episode],
    env_name: str,
    env_kwargs: dict[str, Any] | None = None,
    compression: str | None = None,
    provenance: Sequence[dict[str, Any]] = (),
) -> None:
    """Write `episodes` as `data/demo_<episode_id>`; proprio `[T, 8]` is split into LIBERO's three keys.

    `provenance` (JSON-ready records of how the episodes were made) is stored as `data.attrs["rsd_provenance"]`.
    The file is written beside `path` and renamed over it when complete, so a failed run leaves no half-made file.
    """
    if not episodes:
        raise DataError(f"{path}: expected at least one episode to write, got none.")
    ids = [e.episode_id for e in episodes]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: expected unique episode ids (they name the demo groups), got {ids}.")
    for episode in episodes:
        if episode.proprio is not None and episode.proprio.shape[1] != 8:
            raise DataError(f"{path}: episode {episode.episode_id}: expected proprio [T, 8] (ee_pos 3 + ee_ori 3 + gripper_states 2), "
                            f"got {episode.proprio.shape}.")
    with atomic_file(path) as temporary:
        _write_file(temporary, episodes, env_name, env_kwargs, compression, provenance)


def _write_file(path: Path, episodes: Sequence[Episode], env_name: str, env_kwargs: dict[str, Any] | None, compression: str | None,
                provenance: Sequence[dict[str, Any]]) -> None:
    """The HDF5 file of `write_demos` at `path`."""
    instructions = sorted({e.instruction for e in episodes})
    with h5py.File(path, "w") as file:
        data = file.create_group("data")
        data.attrs["env_name"] = env_name
        data.attrs["env_args"] = json.dumps({"type": 1, "env_name": env_name, "env_kwargs": env_kwargs or {}})
        data.attrs["problem_info"] = json.dumps({
            "problem_name": env_name,
            "domain_name": env_name.split(":")[0],
            "language_instruction": instructions[0] if len(instructions) == 1 else "",  # mixed: see the demo attrs
        })
        data.attrs["bddl_file_name"] = ""  # no BDDL task file outside LIBERO
        data.attrs["macros_image_convention"] = "opencv"  # frames stored upright
        data.attrs["num_demos"] = len(episodes)
        data.attrs["total"] = sum(len(e) for e in episodes)
        data.attrs["rsd_provenance"] = json.dumps(list(provenance))
        for episode in episodes:
            steps = len(episode)
            demo = data.create_group(f"demo_{episode.episode_id}")
            demo.attrs["num_samples"] = steps
            demo.attrs["language_instruction"] = episode.instruction
            demo.create_dataset("actions", data=episode.actions.astype(np.float64), compression=compression)
            dones = np.zeros(steps, dtype=np.uint8)
            dones[-1] = 1
            demo.create_dataset("dones", data=dones)
            demo.create_dataset("rewards", data=dones.copy())
            obs = demo.create_group("obs")
            for camera, frames in episode.images.items():
                obs.create_dataset(f"{camera}_rgb", data=frames, compression=compression, chunks=(1, *frames.shape[1:]))
            if episode.proprio is not None:
                for key, part in PROPRIO_SPLIT.items():
                    obs.create_dataset(key, data=episode.proprio[:, part].astype(np.float64))
            if episode.object_state is not None:
                obs.create_dataset(OBJECT_KEY, data=episode.object_state.astype(np.float64))


@contextmanager
def open_hdf5(path: Path) -> Iterator[h5py.File]:
    """The HDF5 file `path` open for reading; h5py's OSError on opening or reading it is a DataError naming the file."""
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise DataError(f"{path}: expected an HDF5 file, got one h5py cannot open ({error}).") from error
    try:
        with file:
            yield file
    except OSError as error:
        raise DataError(f"{path}: expected a readable HDF5 file, got one whose data h5py cannot read (truncated?): {error}.") from error


def _text(value: Any) -> str:
    """An HDF5 string attribute as `str` (h5py returns `bytes` for fixed-length strings)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def data_group(path: str | Path, file: h5py.File) -> h5py.Group:
    """The `data` group of the open robomimic/LIBERO file `file` read from `path`; a DataError naming the keys if absent."""
    if "data" not in file:
        raise DataError(f"{path}: expected a group 'data' (robomimic/LIBERO layout), got keys {sorted(file)}.")
    return file["data"]


def demo_names(path: str | Path, data: h5py.Group) -> list[str]:
    """The `demo_<i>` group names in numeric order (demo_10 after demo_9)."""
    names = [name for name in data if DEMO_NAME.fullmatch(name)]
    if not names:
        raise DataError(f"{path}: expected groups 'data/demo_<i>', got keys {sorted(data)}.")
    return sorted(names, key=lambda name: int(DEMO_NAME.fullmatch(name).group(1)))


def count_demos(path: str | Path) -> int:
    """How many `data/demo_<i>` groups the robomimic/LIBERO file `path` holds, without reading them."""
    with open_hdf5(Path(path)) as file:
        return len(demo_names(path, data_group(path, file)))


def _instruction(path: Path, data: h5py.Group, demo: h5py.Group) -> str:
    """The demo's `language_instruction` attr, else the file's `problem_info["language_instruction"]`."""
    if demo.attrs.get("language_instruction"):
        return _text(demo.attrs["language_instruction"])
    if "problem_info" in data.attrs:
        text = _text(data.attrs["problem_info"])
        try:
            info = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: expected data.attrs['problem_info'] to be JSON, got {text[:80]!r} ({error}).") from error
        instruction = info.get("language_instruction", "") if isinstance(info, dict) else ""
        if isinstance(instruction, str) and instruction.strip():
            return instruction
    raise DataError(
        f"{path}: {demo.name}: expected an attr 'language_instruction' or data.attrs['problem_info'] JSON with "
        "'language_instruction', got neither. Give one with --instruction (DataSource.instruction)."
    )


def camera_datasets(path: Path, key: str, obs: h5py.Group) -> dict[str, str]:
    """Camera name -> obs dataset: LIBERO's `<camera>_rgb` and robomimic's `<camera>_image`."""
    found: dict[str, str] = {}
    for name in sorted(obs):
        for suffix in CAMERA_SUFFIXES:
            if name.endswith(suffix):
                camera = name[: -len(suffix)]
                if camera in found:
                    raise DataError(f"{path}: expected one dataset per camera, got both '{key}/obs/{found[camera]}' and '{key}/obs/{name}'.")
                found[camera] = name
    return found


def _read_episode(path: Path, data: h5py.Group, name: str, cameras: Sequence[str] | None, proprio_keys: Sequence[str] | None, rotate: bool,
                  action_key: str, image_size: int | None, instruction: str | None) -> Episode:
    """One `data/demo_<i>` group as an Episode, checking every shape against the actions' length T."""
    demo = data[name]
    key = f"data/{name}"
    if action_key not in demo:
        raise DataError(f"{path}: expected dataset '{key}/{action_key}' [T, A], got keys {sorted(demo)}.")
    actions = demo[action_key][()]
    if actions.ndim != 2 or actions.shape[0] == 0 or not np.issubdtype(actions.dtype, np.number):
        raise DataError(f"{path}: expected '{key}/{action_key}' of numbers, shape [T, A] with T > 0, got {actions.dtype} {actions.shape}.")
    steps = actions.shape[0]
    if "obs" not in demo:
        raise DataError(f"{path}: expected group '{key}/obs', got keys {sorted(demo)}.")
    obs = demo["obs"]
    datasets = camera_datasets(path, key, obs)
    available = sorted(datasets)
    wanted = list(cameras) if cameras is not None else available
    if not wanted:
        raise DataError(f"{path}: expected at least one camera '{key}/obs/<camera>_rgb' (or robomimic's <camera>_image) [T, H, W, 3], "
                        f"got keys {sorted(obs)}.")
    images = {}
    for camera in wanted:
        if camera not in available:
            raise DataError(f"{path}: expected camera dataset '{key}/obs/{camera}_rgb' (or _image), got cameras {available}.")
        frames = obs[datasets[camera]][()]
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != steps or frames.shape[3] != 3:
            raise DataError(f"{path}: expected '{key}/obs/{datasets[camera]}' uint8 [{steps}, H, W, 3], got {frames.dtype} {frames.shape}.")
        frames = np.ascontiguousarray(frames[:, ::-1, ::-1]) if rotate else frames
        images[camera] = resize_frames(frames, image_size)
    keys = list(proprio_keys) if proprio_keys is not None else list(PROPRIO_KEYS)
    if proprio_keys is None and any(k in obs for k in keys) and not all(k in obs for k in keys):
        raise DataError(f"{path}: expected LIBERO's proprio datasets {[f'{key}/obs/{k}' for k in keys]}, missing "
                        f"{[k for k in keys if k not in obs]} (obs holds {sorted(obs)}). Choose the proprio keys with --proprio-keys "
                        "(DataSource.proprio_keys), or train without proprio with --proprio-keys none.")
    proprio = None
    if keys and (proprio_keys is not None or all(k in obs for k in keys)):
        parts = []
        for k in keys:
            if k not in obs:
                raise DataError(f"{path}: expected proprio dataset '{key}/obs/{k}' [{steps}, D], got keys {sorted(obs)}.")
            parts.append(_per_step(path, obs, key, k, steps, "D"))
        proprio = np.concatenate(parts, axis=1).astype(np.float32)
    object_state = _per_step(path, obs, key, OBJECT_KEY, steps, "S").astype(np.float32) if OBJECT_KEY in obs else None
    episode_id = int(DEMO_NAME.fullmatch(name).group(1))
    return Episode(episode_id, instruction or _instruction(path, data, demo), actions.astype(np.float32), images, proprio, object_state)


def _per_step(path: Path, obs: h5py.Group, key: str, name: str, steps: int, width: str) -> np.ndarray:
    """Dataset `obs/name` of a demo as numbers `[steps, width]` (trailing dims flattened); a DataError naming it otherwise."""
    values = obs[name][()]
    if values.ndim == 0 or values.shape[0] != steps or not np.issubdtype(values.dtype, np.number):
        raise DataError(f"{path}: expected '{key}/obs/{name}' of numbers, shape [{steps}, {width}], got {values.dtype} {values.shape}.")
    return values.reshape(steps, -1)


def _json_attr(path: str | Path, name: str) -> tuple[bool, Any, str]:
    """`data.attrs[name]` of an HDF5 file parsed as JSON: `(present, value, text)`; a DataError when it is not JSON."""
    with open_hdf5(Path(path)) as file:
        attrs = file["data"].attrs if "data" in file else {}
        if name not in attrs:
            return False, None, ""
        text = _text(attrs[name])
    try:
        return True, json.loads(text), text
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: expected data.attrs['{name}'] to be JSON, got {text[:80]!r} ({error}).") from error


def read_provenance(path: str | Path) -> list[dict[str, Any]]:
    """How a demonstration file's episodes were made: `data.attrs["rsd_provenance"]`, one record per generating run
    (empty when the file does not say, as files of other tools)."""
    present, records, text = _json_attr(path, "rsd_provenance")
    if not present:
        return []
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: expected data.attrs['rsd_provenance'] to be a list of records, got {text[:80]!r}.")
    return records


def read_env_spec(path: str | Path) -> tuple[str, dict[str, Any]] | None:
    """The environment a demonstration file was recorded in, `(env_name, env_kwargs)` from `data.attrs["env_args"]`.

    None when the file does not say (files written by other tools may lack `env_args`); the name may be a label rsd does
    not build, as in files converted from a LeRobot folder (`rsd.envs.base.is_env_name` tells).
    """
    _, args, _ = _json_attr(path, "env_args")
    if not isinstance(args, dict):
        return None
    name = args.get("env_name")
    return (name, dict(args.get("env_kwargs") or {})) if isinstance(name, str) and name else None


def recorded_by_libero(data: h5py.Group) -> bool:
    """True for a file LIBERO's own tools recorded, whose actions hold LIBERO's controller gripper (-1 open / +1 close).

    LIBERO's `create_dataset.py` names the task's BDDL file in `data.attrs["bddl_file_name"]`; OpenVLA's no-noops
    regeneration of those files keeps no file attrs at all. rsd's files (`write_demos`) carry `env_args` and an empty
    `bddl_file_name`; robomimic's carry `env_args` and no BDDL file.
    """
    return bool(_text(data.attrs.get("bddl_file_name", ""))) or "env_args" not in data.attrs


def libero_gripper_to_policy(gripper: np.ndarray) -> np.ndarray:
    """LIBERO's recorded gripper command (-1 open / +1 close) in OpenVLA's LIBERO policy units (1 open / 0 closed)."""
    return ((1.0 - np.clip(gripper, -1.0, 1.0)) / 2.0).astype(np.float32)


def read_demos(path: str | Path, cameras: Sequence[str] | None = None, proprio_keys: Sequence[str] | None = None, action_key: str = "actions",
               image_convention: str | None = None, instruction: str | None = None, image_size: int | None = None,
               first: int | None = None) -> list[Episode]:
    """Read every `data/demo_<i>` of a robomimic/LIBERO file (only the first `first` when set) as Episodes, in numeric
    demo order.

    `cameras`: camera names to load (`agentview` for `obs/agentview_rgb`; default all). `proprio_keys`: obs
    datasets concatenated into proprio (default ee_pos + ee_ori + gripper_states when all exist, none when none
    exists, an error when only some do; `[]` for none). `image_convention`: "opengl" rotates frames 180°, "opencv"
    keeps them; None: the file's `macros_image_convention` attr, and a file without one is refused.
    `instruction`: used for every demo instead of the file's own. `image_size`: frames resized to that square side.
    A file LIBERO recorded has its 7-dim actions' gripper mapped to rsd's LIBERO units (module docstring).
    `rsd.data.source.read_episodes` calls this with a `DataSource`'s choices.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: expected an HDF5 demonstration file, got no such file.")
    if first is not None and first < 1:
        raise DataError(f"{path}: expected first >= 1 episodes to read (or None for all), got {first}.")
    with open_hdf5(path) as file:
        data = data_group(path, file)
        rotate = _convention(path, data, image_convention) == "opengl"
        episodes = [_read_episode(path, data, name, cameras, proprio_keys, rotate, action_key, image_size, instruction)
                    for name in demo_names(path, data)[:first]]
        libero = recorded_by_libero(data)
    if libero and episodes[0].actions.shape[1] == LIBERO_ACTION_DIM:
        log.info("%s: recorded by LIBERO: gripper actions (-1 open / +1 close) mapped to rsd's LIBERO units (1 open / 0 closed).", path)
        for episode in episodes:
            episode.actions[:, -1] = libero_gripper_to_policy(episode.actions[:, -1])
    if proprio_keys is None and episodes[0].proprio is None:
        log.warning("%s: no proprio (none of %s in obs); reading without it. Choose keys with --proprio-keys, or pass "
                    "--proprio-keys none to say so.", path, ", ".join(PROPRIO_KEYS))
    return episodes


def _convention(path: Path, data: h5py.Group, chosen: str | None) -> str:
    """The frames' convention: `chosen`, else the file's `macros_image_convention`; a file that records none is refused."""
    recorded = _text(data.attrs["macros_image_convention"]) if "macros_image_convention" in data.attrs else None
    if chosen is not None:
        if recorded is not None and recorded != chosen:
            log.warning("%s: records macros_image_convention %r; reading it as %r as asked.", path, recorded, chosen)
        return chosen
    if recorded is None:
        raise DataError(f"{path}: expected data.attrs['macros_image_convention'] ('opengl': frames stored upside down, as robosuite "
                        "renders them; 'opencv': upright), got no such attr. rsd does not guess: a wrong guess trains the policy on "
                        "mirror images of what it sees in the loop. Pass --image-convention opengl|opencv (DataSource.image_convention).")
    if recorded not in IMAGE_CONVENTIONS:
        raise DataError(f"{path}: expected macros_image_convention one of {list(IMAGE_CONVENTIONS)}, got {recorded!r}. "
                        "Pass --image-convention to choose.")
    return recorded

