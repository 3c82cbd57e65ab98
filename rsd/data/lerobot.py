"""LeRobotDataset folders (v3.0, and v2.1/v2.0) read into Episodes, and Episodes written as LeRobot v3.0.

Read with pyarrow and PyAV from the documented layout, not with the `lerobot` packages: `lerobot` pins
torch < 2.11 and the standalone `lerobot-dataset` pins huggingface-hub < 0.36, while transformers 5 needs
huggingface-hub >= 1.3, so neither installs beside rsd (README "LeRobot datasets").

v3.0 layout (`codebase_version` "v3.0"):
- `meta/info.json`: `fps`, `features` (`{key: {dtype, shape, names, info?}}`; dtype "video" or "image" for cameras),
  `data_path` / `video_path` templates with `{chunk_index}`, `{file_index}` (and `{video_key}`), `chunks_size`.
- `meta/episodes/chunk-XXX/file-YYY.parquet`: one row per episode: `episode_index`, `tasks` (list of str),
  `length`, `data/chunk_index`, `data/file_index`, `dataset_from_index`, `dataset_to_index`, per video key
  `videos/<key>/{chunk_index,file_index,from_timestamp,to_timestamp}`, and `stats/<feature>/<stat>`.
- `meta/tasks.parquet`: `task_index` and the task string (pandas index column `__index_level_0__`).
- `meta/stats.json`: `{feature: {min, max, mean, std, count, q01, q10, q50, q90, q99}}` over the whole dataset.
- `data/chunk-XXX/file-YYY.parquet`: one row per frame, many episodes per file: every non-video feature plus
  `timestamp`, `frame_index`, `episode_index`, `index`, `task_index`.
- `videos/<key>/chunk-XXX/file-YYY.mp4`: many episodes per file; frame i of an episode is at
  `from_timestamp + timestamp_i` seconds.

v2.1/v2.0: one parquet and one MP4 per episode (`data_path` with `{episode_chunk}`, `{episode_index}`; chunk =
episode_index // chunks_size), `meta/episodes.jsonl` and `meta/tasks.jsonl`; their statistics hold no quantiles.

Usage:
    episodes = read_lerobot("data/libero_lerobot", cameras=("image",), image_size=64)
    write_lerobot("runs/demo/lerobot", episodes, fps=20)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rsd.data.dataset import Episode
from rsd.data.stats import ActionStats, DatasetStatistics
from rsd.data.video import VIDEO_SETTINGS, VideoSettings, VideoWriter, decode_video, resize_frame
from rsd.errors import DataError, ShapeError
from rsd.io import writes_artifact

log = logging.getLogger(__name__)

INFO = "meta/info.json"
STATS = "meta/stats.json"
TASKS = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
CAMERA_PREFIX = "observation.images."
STATE_KEY = "observation.state"
ACTION_KEY = "action"
TIMESTAMP_TOLERANCE_S = 1e-4  # LeRobotDataset's default tolerance between a frame's timestamp and the decoded frame
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
LIBERO_STATE_NAMES = ["ee_pos.x", "ee_pos.y", "ee_pos.z", "ee_ori.x", "ee_ori.y", "ee_ori.z", "gripper_states.0", "gripper_states.1"]


def require_pyarrow():  # noqa: ANN201 - returns the module
    """`pyarrow.parquet`, or a DataError saying how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise DataError("LeRobot datasets need pyarrow and PyAV: expected `import pyarrow` to work, got ImportError; "
                        "install them with pip install 'rsd[lerobot]'.") from error
    return pq


def is_lerobot_dataset(path: str | Path) -> bool:
    """True when `path` is a folder with `meta/info.json` (a LeRobotDataset root)."""
    return (Path(path) / INFO).is_file()


def camera_name(key: str) -> str:
    """The Episode camera name of a LeRobot image key: `observation.images.wrist` -> `wrist`; other keys stay whole."""
    return key[len(CAMERA_PREFIX):] if key.startswith(CAMERA_PREFIX) else key


@dataclass
class _EpisodeEntry:
    """Where one episode's rows and frames are stored."""

    index: int  # episode_index
    length: int  # frames
    tasks: list[str]  # the episode's task strings
    data_file: Path  # parquet file holding its rows
    videos: dict[str, tuple[Path, float]] = field(default_factory=dict)  # video key -> (mp4 file, from_timestamp)


class LeRobotFolder:
    """The metadata of a LeRobotDataset folder: info, tasks and where each episode is stored."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: expected a LeRobotDataset folder, got no such folder.")
        info_path = self.root / INFO
        if not info_path.is_file():
            raise DataError(f"{self.root}: expected a LeRobotDataset folder with {INFO}, got no such file.")
        try:
            self.info = json.loads(info_path.read_text())
        except json.JSONDecodeError as error:
            raise DataError(f"{info_path}: expected JSON, got a parse error ({error}).") from error
        missing = [k for k in ("codebase_version", "fps", "features", "data_path") if k not in self.info]
        if missing:
            raise DataError(f"{info_path}: expected keys codebase_version, fps, features, data_path; missing {missing}.")
        self.version = str(self.info["codebase_version"])
        if self.version.startswith("v3"):
            self.entries = self._v3_entries()
        elif self.version in ("v2.0", "v2.1"):
            self.entries = self._v2_entries()
        else:
            raise DataError(f"{info_path}: expected codebase_version v3.0, v2.1 or v2.0, got {self.version!r}.")
        if not self.entries:
            raise DataError(f"{self.root}: expected at least one episode in the episode metadata, got none.")

    @property
    def features(self) -> dict[str, dict[str, Any]]:
        """`info.json`'s features: key -> {dtype, shape, names, ...}."""
        return self.info["features"]

    @property
    def fps(self) -> int:
        """Frames per second."""
        return int(self.info["fps"])

    def camera_keys(self) -> list[str]:
        """Feature keys stored as video or as images, sorted."""
        return sorted(k for k, v in self.features.items() if v.get("dtype") in ("video", "image"))

    def _read_table(self, path: Path, what: str, columns: list[str] | None = None) -> Any:
        """A parquet file as a pyarrow Table; an unreadable file is a DataError naming `what` it holds."""
        pq = require_pyarrow()
        import pyarrow as pa

        if not path.is_file():
            raise DataError(f"{path}: {what}: expected a parquet file, got no such file.")
        try:
            return pq.read_table(path, columns=columns)
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{path}: {what}: expected a readable parquet file, pyarrow failed: {error}.") from error

    def _v3_entries(self) -> list[_EpisodeEntry]:
        """Episode entries from `meta/episodes/*/*.parquet` (v3.0): data file, video files and start times per episode."""
        files = sorted((self.root / EPISODES_DIR).glob("*/*.parquet"))
        if not files:
            raise DataError(f"{self.root / EPISODES_DIR}: expected episode metadata chunk-XXX/file-YYY.parquet, got none.")
        rows: list[dict[str, Any]] = []
        for path in files:
            table = self._read_table(path, "episode metadata")
            keep = [c for c in table.column_names if not c.startswith("stats/")]
            rows.extend(table.select(keep).to_pylist())
        video_keys = [k for k, v in self.features.items() if v.get("dtype") == "video"]
        needed = ["episode_index", "length", "data/chunk_index", "data/file_index"]
        needed += [f"videos/{k}/{c}" for k in video_keys for c in ("chunk_index", "file_index", "from_timestamp")]
        entries = []
        for row in sorted(rows, key=lambda r: r.get("episode_index", -1)):
            missing = [k for k in needed if row.get(k) is None]
            if missing:
                raise DataError(f"{self.root / EPISODES_DIR}: episode {row.get('episode_index')}: expected columns {needed}, missing {missing}.")
            index = int(row["episode_index"])
            data_file = self.root / self.info["data_path"].format(chunk_index=int(row["data/chunk_index"]), file_index=int(row["data/file_index"]))
            videos = {}
            for key in video_keys:
                video_file = self.root / self.info["video_path"].format(
                    video_key=key, chunk_index=int(row[f"videos/{key}/chunk_index"]), file_index=int(row[f"videos/{key}/file_index"]))
                videos[key] = (video_file, float(row[f"videos/{key}/from_timestamp"]))
            entries.append(_EpisodeEntry(index, int(row["length"]), list(row.get("tasks") or []), data_file, videos))
        return entries

    def _v2_entries(self) -> list[_EpisodeEntry]:
        """Episode entries from `meta/episodes.jsonl` (v2.x): one parquet and one MP4 per episode."""
        path = self.root / "meta/episodes.jsonl"
        if not path.is_file():
            raise DataError(f"{self.root}: expected meta/episodes.jsonl (LeRobot {self.version}), got no such file.")
        chunks_size = int(self.info.get("chunks_size", 1000))
        video_keys = [k for k, v in self.features.items() if v.get("dtype") == "video"]
        entries = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                index, length = int(row["episode_index"]), int(row["length"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise DataError(f"{path}: line {number}: expected a JSON object with episode_index and length, got {line[:80]!r}.") from error
            fields = {"episode_chunk": index // chunks_size, "episode_index": index}
            data_file = self.root / self.info["data_path"].format(**fields)
            videos = {k: (self.root / self.info["video_path"].format(video_key=k, **fields), 0.0) for k in video_keys}
            entries.append(_EpisodeEntry(index, length, list(row.get("tasks") or []), data_file, videos))
        return sorted(entries, key=lambda e: e.index)

    def tasks(self) -> dict[int, str]:
        """task_index -> task string, from `meta/tasks.parquet` (v3) or `meta/tasks.jsonl` (v2)."""
        if self.version.startswith("v3"):
            path = self.root / TASKS
            table = self._read_table(path, "tasks")
            pandas_meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
            index_columns = [c for c in pandas_meta.get("index_columns", []) if isinstance(c, str)]
            text = "task" if "task" in table.column_names else next(iter(index_columns), "__index_level_0__")
            if "task_index" not in table.column_names or text not in table.column_names:
                raise DataError(f"{path}: expected columns task_index and the task string ('task' or the pandas index), "
                                f"got {table.column_names}.")
            return {int(i): str(t) for i, t in zip(table.column("task_index").to_pylist(), table.column(text).to_pylist(), strict=True)}
        path = self.root / "meta/tasks.jsonl"
        if not path.is_file():
            raise DataError(f"{self.root}: expected meta/tasks.jsonl (LeRobot {self.version}), got no such file.")
        tasks = {}
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                tasks[int(row["task_index"])] = str(row["task"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise DataError(f"{path}: line {number}: expected a JSON object with task_index and task, got {line[:80]!r}.") from error
        return tasks


def _resolve_keys(folder: LeRobotFolder, wanted: Sequence[str] | None, available: list[str], what: str) -> list[str]:
    """Feature keys for the names a user gave (full keys or camera names), all of `available` when None."""
    if wanted is None:
        return available
    keys = []
    for name in wanted:
        matches = [k for k in available if name in (k, camera_name(k))]
        if not matches:
            raise DataError(f"{folder.root}: expected {what} {name!r} among {available}, got no such feature.")
        keys.append(matches[0])
    return keys


def _numeric_column(table: Any, key: str, path: Path, what: str) -> np.ndarray:
    """A numeric column as `[N, D]` (fixed-size list, list or scalar; a scalar gives `[N, 1]`), converted once per file."""
    import pyarrow as pa

    column = table.column(key).combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        try:
            return np.asarray(column.to_pylist(), dtype=np.float64).reshape(len(column), -1)
        except (TypeError, ValueError) as error:
            raise DataError(f"{path}: {what}: expected column {key!r} to hold equal-length numeric lists, got ragged or null rows.") from error
    return column.to_numpy(zero_copy_only=False).reshape(len(column), -1)


@dataclass
class _Rows:
    """One episode's rows of its data file, in frame order."""

    path: Path  # the data file
    values: dict[str, np.ndarray]  # numeric feature key -> [T, D]
    images: dict[str, list[Any]]  # image-dtype feature key -> T structs {bytes, path}


def _episode_rows(folder: LeRobotFolder, numeric: list[str], image_keys: Sequence[str] = ()) -> dict[int, _Rows]:
    """Every episode's rows: each data file read once, its columns converted once, rows checked against the metadata's length."""
    by_file: dict[Path, list[_EpisodeEntry]] = {}
    for entry in folder.entries:
        by_file.setdefault(entry.data_file, []).append(entry)
    rows_of: dict[int, _Rows] = {}
    for path, entries in by_file.items():
        what = "episode " + ", ".join(str(e.index) for e in entries)
        table = _read_data_file(folder, path, [*numeric, *image_keys, "episode_index", "frame_index"], what)
        columns = {key: _numeric_column(table, key, path, what) for key in numeric}
        episode_column = _numeric_column(table, "episode_index", path, what)[:, 0].astype(np.int64)
        frame_column = _numeric_column(table, "frame_index", path, what)[:, 0].astype(np.int64)
        for entry in entries:
            rows = np.flatnonzero(episode_column == entry.index)
            rows = rows[np.argsort(frame_column[rows], kind="stable")]
            if len(rows) != entry.length or not np.array_equal(frame_column[rows], np.arange(entry.length)):
                raise DataError(f"{path}: episode {entry.index}: expected frames 0..{entry.length - 1} (the metadata's length), "
                                f"got {len(rows)} rows with frame_index {frame_column[rows][:5].tolist()}...")
            images = {key: table.column(key).take(rows).to_pylist() for key in image_keys}
            rows_of[entry.index] = _Rows(path, {key: column[rows] for key, column in columns.items()}, images)
    return rows_of


def _decode_images(column: list[Any], path: Path, episode: int, key: str, size: int | None) -> np.ndarray:
    """PNG/JPEG bytes of an `image` feature (`{bytes, path}` structs) as uint8 `[T, H, W, 3]`."""
    import io

    from PIL import Image, UnidentifiedImageError

    frames = []
    for item in column:
        data = item.get("bytes") if isinstance(item, dict) else None
        if not data:
            raise DataError(f"{path}: episode {episode}: expected embedded image bytes in column {key!r}, got {str(item)[:60]!r}.")
        try:
            frames.append(resize_frame(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8), size))
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"{path}: episode {episode}: expected a PNG/JPEG image in column {key!r}, got unreadable bytes ({error}).") from error
    return np.stack(frames)


def _match_frames(times: np.ndarray, frames: np.ndarray, wanted: np.ndarray, path: Path, episode: int) -> np.ndarray:
    """The decoded frames nearest to timestamps `wanted [T]`; a gap over TIMESTAMP_TOLERANCE_S is a DataError."""
    position = np.clip(np.searchsorted(times, wanted), 1, len(times) - 1) if len(times) > 1 else np.zeros(len(wanted), dtype=np.int64)
    if len(times) > 1:
        left = times[position - 1]
        position = np.where(np.abs(wanted - left) <= np.abs(times[position] - wanted), position - 1, position)
    gap = np.abs(times[position] - wanted)
    if (gap > TIMESTAMP_TOLERANCE_S).any():
        bad = int(np.argmax(gap > TIMESTAMP_TOLERANCE_S))
        raise DataError(
            f"{path}: episode {episode}: expected a frame at {wanted[bad]:.4f} s (frame {bad}) within {TIMESTAMP_TOLERANCE_S} s, "
            f"the nearest decoded frame is at {times[position[bad]]:.4f} s ({len(times)} frames decoded from "
            f"{times[0]:.4f} to {times[-1]:.4f} s): the video is truncated or its timestamps disagree with the episode metadata."
        )
    return frames[position]


def read_lerobot(
    root: str | Path,
    cameras: Sequence[str] | None = None,
    state_keys: Sequence[str] | None = None,
    action_key: str = ACTION_KEY,
    image_size: int | None = None,
) -> list[Episode]:
    """Every episode of a LeRobotDataset folder as an Episode (frames uint8 `[T, H, W, 3]` as stored, or resized while decoding).

    `cameras`: image features to load, by key (`observation.images.wrist`) or camera name (`wrist`); None: all.
    `image_size`: resize every frame to image_size x image_size (Lanczos) as it is decoded, so big videos never sit in memory.
    `state_keys`: features concatenated into proprio; None: `observation.state` when present; `()`: none.
    The instruction is the episode's task (the frame's `task_index` in the tasks table).
    """
    folder = LeRobotFolder(root)
    features = folder.features
    if action_key not in features:
        raise DataError(f"{folder.root / INFO}: expected an action feature {action_key!r}, got features {sorted(features)}.")
    camera_keys = _resolve_keys(folder, cameras, folder.camera_keys(), "camera")
    if not camera_keys:
        raise DataError(f"{folder.root / INFO}: expected at least one feature of dtype video or image, got {sorted(features)}.")
    numeric = sorted(k for k, v in features.items() if v.get("dtype") not in ("video", "image", "string"))
    if state_keys is None:
        state = [STATE_KEY] if STATE_KEY in features else []
    else:
        state = _resolve_keys(folder, state_keys, numeric, "state key")
    tasks = folder.tasks()
    image_keys = [k for k in camera_keys if features[k]["dtype"] == "image"]
    rows_of = _episode_rows(folder, [action_key, *state, "timestamp", "task_index"], image_keys)
    frames_of = _read_videos(folder, [k for k in camera_keys if features[k]["dtype"] == "video"], rows_of, image_size)
    episodes = []
    for entry in folder.entries:
        rows = rows_of[entry.index]
        task_index = int(rows.values["task_index"][0, 0])
        if task_index not in tasks:
            raise DataError(f"{rows.path}: episode {entry.index}: expected task_index in the tasks table {sorted(tasks)}, got {task_index}.")
        images = {camera_name(k): frames_of[(k, entry.index)] for k in camera_keys if features[k]["dtype"] == "video"}
        for key in image_keys:
            images[camera_name(key)] = _decode_images(rows.images[key], rows.path, entry.index, key, image_size)
        proprio = np.concatenate([rows.values[k] for k in state], axis=1).astype(np.float32) if state else None
        try:
            episodes.append(Episode(entry.index, tasks[task_index], rows.values[action_key].astype(np.float32), images, proprio))
        except (DataError, ShapeError) as error:
            raise DataError(f"{rows.path}: {error}") from error
    return episodes


def _read_data_file(folder: LeRobotFolder, path: Path, columns: list[str], what: str) -> Any:
    """The wanted columns of one data parquet file; missing columns are a DataError naming the file's episodes."""
    pq = require_pyarrow()
    import pyarrow as pa

    if not path.is_file():
        raise DataError(f"{path}: {what}: expected a data parquet file, got no such file.")
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: {what}: expected a readable parquet file, pyarrow failed: {error}.") from error
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path}: {what}: expected columns {columns}, missing {missing}.")
    return folder._read_table(path, what, columns)


def _read_videos(folder: LeRobotFolder, keys: list[str], rows_of: dict[int, _Rows], size: int | None) -> dict[tuple[str, int], np.ndarray]:
    """Frames `[T, H, W, 3]` per (video key, episode): each file decoded once (resized to `size`), frames matched to timestamps."""
    frames_of = {}
    for key in keys:
        by_file: dict[Path, list[_EpisodeEntry]] = {}
        for entry in folder.entries:
            by_file.setdefault(entry.videos[key][0], []).append(entry)
        for path, entries in by_file.items():
            times, frames = decode_video(path, "episode " + ", ".join(str(e.index) for e in entries), size)
            for entry in entries:
                stamps = rows_of[entry.index].values["timestamp"][:, 0].astype(np.float64)
                frames_of[(key, entry.index)] = _match_frames(times, frames, entry.videos[key][1] + stamps, path, entry.index)
    return frames_of


def _stats_entry(data: dict[str, Any], key: str, path: Path) -> ActionStats | None:
    """One feature of `meta/stats.json` as ActionStats, or None (logged) when it has no q01/q99."""
    if key not in data:
        log.info("%s: no statistics for %r; q01/q99 come from the training episodes instead.", path, key)
        return None
    entry = data[key]
    missing = [k for k in ("q01", "q99") if k not in entry]
    if missing:
        log.info("%s: the statistics of %r hold %s but no %s (LeRobot v2.x statistics have no quantiles); q01/q99 come from "
                 "the training episodes instead, not from min/max.", path, key, sorted(entry), missing)
        return None
    flat = {k: np.asarray(entry[k], dtype=np.float64).reshape(-1).tolist() for k in ("mean", "std", "min", "max", "q01", "q99") if k in entry}
    return ActionStats.from_json(flat)


def read_lerobot_statistics(root: str | Path, state_keys: Sequence[str] | None = None, action_key: str = ACTION_KEY) -> DatasetStatistics | None:
    """The dataset's own `meta/stats.json` as q01/q99 statistics of the action (and state), or None, with a log line saying why.

    None when the file is absent or the action's entry has no q01/q99 (then the training episodes supply them);
    proprio is None when any state key lacks quantiles (it is then computed from the training episodes too).
    """
    folder = LeRobotFolder(root)
    path = folder.root / STATS
    if not path.is_file():
        log.info("%s: no such file; q01/q99 come from the training episodes.", path)
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: expected JSON statistics, got a parse error ({error}).") from error
    action = _stats_entry(data, action_key, path)
    if action is None:
        return None
    keys = ([STATE_KEY] if STATE_KEY in folder.features else []) if state_keys is None else list(state_keys)
    parts = [_stats_entry(data, k, path) for k in keys]
    proprio = None
    if parts and all(p is not None for p in parts):
        proprio = ActionStats.from_json({k: [v for p in parts for v in getattr(p, k)] for k in ("mean", "std", "min", "max", "q01", "q99")})
    return DatasetStatistics(action=action, proprio=proprio, num_transitions=int(folder.info.get("total_frames", 0)),
                             num_trajectories=len(folder.entries))


def read_lerobot_actions(root: str | Path, action_key: str = ACTION_KEY) -> tuple[list[np.ndarray], list[int]]:
    """Per-episode actions `[T_i, A]` and episode indices, from the parquet files only (no video is decoded)."""
    folder = LeRobotFolder(root)
    if action_key not in folder.features:
        raise DataError(f"{folder.root / INFO}: expected an action feature {action_key!r}, got features {sorted(folder.features)}.")
    rows_of = _episode_rows(folder, [action_key])
    ids = [e.index for e in folder.entries]
    return [rows_of[i].values[action_key].astype(np.float32) for i in ids], ids


# ----------------------------------------------------------------------------------------------------------------
# Writing (LeRobot v3.0)


def feature_stats(values: np.ndarray) -> dict[str, list[Any]]:
    """LeRobot's per-feature statistics of rows `[N, D]`: min, max, mean, std, count and q01..q99 (exact quantiles)."""
    values = np.asarray(values, dtype=np.float64)
    stats: dict[str, list[Any]] = {
        "min": values.min(0).tolist(), "max": values.max(0).tolist(), "mean": values.mean(0).tolist(),
        "std": values.std(0).tolist(), "count": [int(values.shape[0])],
    }
    for q in QUANTILES:
        stats[f"q{round(q * 100):02d}"] = np.quantile(values, q, axis=0).tolist()
    return stats


def image_stats(frames: np.ndarray, max_pixels: int = 200_000, seed: int = 0) -> dict[str, list[Any]]:
    """Per-channel statistics of uint8 frames `[N, H, W, 3]` in [0, 1], shaped `[3, 1, 1]` as LeRobot stores them.

    At most `max_pixels` pixels (a seeded random subset) enter the statistics, as LeRobot also samples frames.
    """
    pixels = frames.reshape(-1, 3)
    if len(pixels) > max_pixels:
        pixels = pixels[np.random.default_rng(seed).choice(len(pixels), max_pixels, replace=False)]
    stats = feature_stats(pixels.astype(np.float64) / 255.0)
    return {k: (v if k == "count" else [[[x]] for x in v]) for k, v in stats.items()}


def _fixed_list(values: np.ndarray) -> Any:
    """Rows `[N, D]` float32 as an Arrow fixed-size list column (the type `datasets` gives a shaped feature)."""
    import pyarrow as pa

    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=pa.float32()), values.shape[1])


def _tasks_table(tasks: list[str]) -> Any:
    """`meta/tasks.parquet` as pandas 3 writes it: column task_index, the task string as the index `__index_level_0__`."""
    import pyarrow as pa

    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "str", "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64", "metadata": None},
            {"name": None, "field_name": "__index_level_0__", "pandas_type": "object", "numpy_type": "str", "metadata": None},
        ],
        "attributes": {},
        "creator": {"library": "pyarrow", "version": pa.__version__},
    }
    table = pa.table({"task_index": pa.array(range(len(tasks)), type=pa.int64()), "__index_level_0__": pa.array(tasks, type=pa.large_string())})
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


class _RollingIndex:
    """LeRobot's (chunk_index, file_index) counter: the next file after `chunks_size` files starts a new chunk."""

    def __init__(self, chunks_size: int) -> None:
        self.chunks_size = chunks_size
        self.chunk, self.file = 0, 0

    def advance(self) -> None:
        """Move to the next file."""
        self.file += 1
        if self.file == self.chunks_size:
            self.chunk, self.file = self.chunk + 1, 0


@writes_artifact("LeRobot dataset")
def write_lerobot(
    out: str | Path,
    episodes: Sequence[Episode],
    fps: int,
    video: VideoSettings = VIDEO_SETTINGS["high"],
    robot_type: str | None = None,
    chunks_size: int = 1000,
    data_file_mb: float = 100.0,
    video_file_mb: float = 200.0,
) -> dict[str, Any]:
    """Write `episodes` as a LeRobot v3.0 folder `out` (parquet rows, one MP4 stream per camera); return a summary (no paths).

    Episode indices are 0..N-1 in the order given (LeRobot indexes its episode table by position). Camera `c` is
    feature `observation.images.c`, proprio is `observation.state`, actions `action`; each instruction is a task.
    A data or video file is closed and the next one started once it exceeds `data_file_mb` / `video_file_mb`.
    `out` is written through a staging folder (`rsd.io.writes_artifact`); an existing dataset there needs `overwrite=True`.
    """
    pq = require_pyarrow()
    import pyarrow as pa

    out = Path(out)
    if not episodes:
        raise DataError(f"{out}: expected at least one episode to write, got none.")
    cameras = {tuple(e.cameras) for e in episodes}
    has_state = {e.proprio is not None for e in episodes}
    dims = {(e.actions.shape[1], None if e.proprio is None else e.proprio.shape[1]) for e in episodes}
    shapes = {(c, e.images[c].shape[1:]) for e in episodes for c in e.cameras}
    if len(cameras) != 1 or len(has_state) != 1 or len(dims) != 1 or len(shapes) != len(next(iter(cameras))):
        raise DataError(f"{out}: expected every episode to have the same cameras, frame sizes, action and proprio sizes, "
                        f"got cameras {sorted(cameras)}, sizes {sorted(shapes)}, (action, proprio) dims {sorted(dims, key=str)}.")
    camera_list = list(next(iter(cameras)))
    action_dim, state_dim = next(iter(dims))
    tasks = sorted({e.instruction for e in episodes})
    task_index = {t: i for i, t in enumerate(tasks)}
    video_keys = {c: CAMERA_PREFIX + c for c in camera_list}
    features: dict[str, Any] = {ACTION_KEY: {"dtype": "float32", "shape": [action_dim], "names": [f"action.{i}" for i in range(action_dim)]}}
    if state_dim is not None:
        names = LIBERO_STATE_NAMES if state_dim == len(LIBERO_STATE_NAMES) else [f"state.{i}" for i in range(state_dim)]
        features[STATE_KEY] = {"dtype": "float32", "shape": [state_dim], "names": names}
    for camera, key in video_keys.items():
        height, width = dict(shapes)[camera][:2]
        features[key] = {"dtype": "video", "shape": [height, width, 3], "names": ["height", "width", "channels"], "info": {
            "video.height": height, "video.width": width, "video.codec": "h264" if video.codec == "libx264" else "av1",
            "video.pix_fmt": video.pix_fmt, "video.is_depth_map": False, "video.fps": fps, "video.channels": 3, "has_audio": False}}
    features.update(DEFAULT_FEATURES)

    data_index, video_index = _RollingIndex(chunks_size), {c: _RollingIndex(chunks_size) for c in camera_list}
    writers = {c: VideoWriter(out / VIDEO_PATH.format(video_key=video_keys[c], chunk_index=0, file_index=0), fps, video) for c in camera_list}
    pending: list[Any] = []
    rows, total = [], 0

    def flush_data() -> None:
        path = out / DATA_PATH.format(chunk_index=data_index.chunk, file_index=data_index.file)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables(pending), path, compression="snappy")
        pending.clear()

    try:
        for position, episode in enumerate(episodes):
            steps = len(episode)
            columns = {ACTION_KEY: _fixed_list(episode.actions)}
            if state_dim is not None:
                columns[STATE_KEY] = _fixed_list(episode.proprio)
            columns.update({
                "timestamp": pa.array(np.arange(steps, dtype=np.float32) / np.float32(fps), type=pa.float32()),
                "frame_index": pa.array(np.arange(steps), type=pa.int64()),
                "episode_index": pa.array(np.full(steps, position), type=pa.int64()),
                "index": pa.array(np.arange(total, total + steps), type=pa.int64()),
                "task_index": pa.array(np.full(steps, task_index[episode.instruction]), type=pa.int64()),
            })
            if pending and sum(t.nbytes for t in pending) > data_file_mb * 2**20:
                flush_data()
                data_index.advance()
            pending.append(pa.table(columns))
            row: dict[str, Any] = {"episode_index": position, "tasks": [episode.instruction], "length": steps,
                                   "data/chunk_index": data_index.chunk, "data/file_index": data_index.file,
                                   "dataset_from_index": total, "dataset_to_index": total + steps}
            for camera in camera_list:
                if writers[camera].frames and writers[camera].bytes > video_file_mb * 2**20:
                    writers[camera].close()
                    video_index[camera].advance()
                    writers[camera] = VideoWriter(out / VIDEO_PATH.format(video_key=video_keys[camera], chunk_index=video_index[camera].chunk,
                                                                          file_index=video_index[camera].file), fps, video)
                start = writers[camera].append(episode.images[camera])
                prefix = f"videos/{video_keys[camera]}"
                row.update({f"{prefix}/chunk_index": video_index[camera].chunk, f"{prefix}/file_index": video_index[camera].file,
                            f"{prefix}/from_timestamp": start, f"{prefix}/to_timestamp": start + steps / fps})
            per_episode = _episode_stats(episode, video_keys, total, position, task_index[episode.instruction], fps)
            row.update({f"stats/{k}/{s}": v for k, entry in per_episode.items() for s, v in entry.items()})
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            rows.append(row)
            total += steps
        flush_data()
    finally:
        for writer in writers.values():
            writer.close()

    episodes_path = out / EPISODES_PATH.format(chunk_index=0, file_index=0)
    episodes_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), episodes_path)
    pq.write_table(_tasks_table(tasks), out / TASKS)
    stats = _dataset_stats(episodes, video_keys, fps, task_index)
    (out / STATS).write_text(json.dumps(stats, indent=4) + "\n")
    info = {
        "codebase_version": "v3.0", "robot_type": robot_type, "total_episodes": len(episodes), "total_frames": total,
        "total_tasks": len(tasks), "chunks_size": chunks_size, "data_files_size_in_mb": data_file_mb, "video_files_size_in_mb": video_file_mb,
        "fps": fps, "splits": {"train": f"0:{len(episodes)}"}, "data_path": DATA_PATH, "video_path": VIDEO_PATH, "features": features,
    }
    (out / INFO).write_text(json.dumps(info, indent=4) + "\n")
    return {"episodes": len(episodes), "frames": total, "tasks": len(tasks), "cameras": list(video_keys.values())}


def _episode_stats(episode: Episode, video_keys: dict[str, str], first: int, position: int, task: int, fps: int) -> dict[str, dict[str, list[Any]]]:
    """LeRobot's per-episode statistics (the `stats/...` columns of the episode table)."""
    steps = len(episode)
    frame = np.arange(steps, dtype=np.float64)[:, None]
    stats = {ACTION_KEY: feature_stats(episode.actions)}
    if episode.proprio is not None:
        stats[STATE_KEY] = feature_stats(episode.proprio)
    stats.update({key: image_stats(episode.images[camera]) for camera, key in video_keys.items()})
    stats.update({"timestamp": feature_stats(frame / fps), "frame_index": feature_stats(frame), "episode_index": feature_stats(np.full((steps, 1), position)),
                  "index": feature_stats(first + frame), "task_index": feature_stats(np.full((steps, 1), task))})
    return stats


def _dataset_stats(episodes: Sequence[Episode], video_keys: dict[str, str], fps: int, task_index: dict[str, int]) -> dict[str, Any]:
    """`meta/stats.json`: statistics of every feature over the whole dataset (exact quantiles)."""
    frame = np.concatenate([np.arange(len(e), dtype=np.float64) for e in episodes])[:, None]
    stats: dict[str, Any] = {ACTION_KEY: feature_stats(np.concatenate([e.actions for e in episodes]))}
    if episodes[0].proprio is not None:
        stats[STATE_KEY] = feature_stats(np.concatenate([e.proprio for e in episodes]))
    for camera, key in video_keys.items():
        stats[key] = image_stats(np.concatenate([e.images[camera] for e in episodes]))
    stats.update({
        "timestamp": feature_stats(frame / fps), "frame_index": feature_stats(frame),
        "episode_index": feature_stats(np.concatenate([np.full(len(e), i) for i, e in enumerate(episodes)])[:, None]),
        "index": feature_stats(np.arange(len(frame), dtype=np.float64)[:, None]),
        "task_index": feature_stats(np.concatenate([np.full(len(e), task_index[e.instruction]) for e in episodes])[:, None]),
    })
    return stats
