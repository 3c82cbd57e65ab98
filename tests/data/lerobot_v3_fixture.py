"""The tiny LeRobot v3 dataset in tests/data/lerobot_v3_tiny, written by the field's own writer, and its known content.

`expected_episode(i)` gives what the writer was handed (actions, state, frames, task), so the tests compare rsd's
reader against the source values: actions and state exactly, frames within the AV1 codec's loss.

The folder was written by `LeRobotDataset.create(...)` / `add_frame` / `save_episode` / `finalize` of the
standalone `lerobot-dataset` 0.4.4 package (codebase_version v3.0, libsvtav1 video at crf 30). That package pins
huggingface-hub < 0.36 while transformers 5 needs huggingface-hub >= 1.3, so it cannot live in rsd's environment;
to regenerate the folder, use a throwaway virtual environment:

    python -m venv --system-site-packages /tmp/lrvenv && /tmp/lrvenv/bin/pip install lerobot-dataset==0.4.4
    rm -rf tests/data/lerobot_v3_tiny && /tmp/lrvenv/bin/python tests/data/lerobot_v3_fixture.py tests/data/lerobot_v3_tiny
"""

from __future__ import annotations

import sys

import numpy as np

LENGTHS = (10, 12, 9)  # frames per episode
TASKS = ("put the bowl on the plate", "open the top drawer", "put the bowl on the plate")
CAMERAS = ("image", "wrist_image")  # observation.images.<camera>, openpi's LIBERO names
SIZE = 64  # frame side in pixels
FPS = 10


def expected_episode(index: int) -> dict[str, object]:
    """Episode `index` as handed to the writer: `action [T, 7]`, `state [T, 8]` float32, `frames` per camera `[T, H, W, 3]`."""
    steps = LENGTHS[index]
    t = np.arange(steps, dtype=np.float32)[:, None]
    action = np.sin(0.3 * t + np.arange(7, dtype=np.float32) + index).astype(np.float32)
    state = (np.cos(0.2 * t + 0.5 * np.arange(8, dtype=np.float32)) * (index + 1)).astype(np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    frames = {}
    for c, camera in enumerate(CAMERAS):
        video = np.empty((steps, SIZE, SIZE, 3), dtype=np.uint8)
        for f in range(steps):
            cx, cy = 16 + 3 * f + 5 * c, 20 + 2 * index
            blob = 150.0 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 120.0)
            video[f, ..., 0] = np.clip(40 + 2 * xx + blob, 0, 255)
            video[f, ..., 1] = np.clip(60 + 2 * yy + 30 * index, 0, 255)
            video[f, ..., 2] = np.clip(200 - blob + 20 * c, 0, 255)
        frames[camera] = video
    return {"action": action, "state": state, "frames": frames, "task": TASKS[index]}


def write_fixture(root: str) -> None:
    """Write the dataset with lerobot-dataset's LeRobotDataset (needs that package; see the module docstring)."""
    from ledataset.datasets.lerobot_dataset import LeRobotDataset

    features = {
        "observation.state": {"dtype": "float32", "shape": (8,), "names": [f"s{i}" for i in range(8)]},
        "action": {"dtype": "float32", "shape": (7,), "names": [f"a{i}" for i in range(7)]},
        **{f"observation.images.{camera}": {"dtype": "video", "shape": (SIZE, SIZE, 3), "names": ["height", "width", "channels"]}
           for camera in CAMERAS},
    }
    dataset = LeRobotDataset.create("rsd/lerobot_v3_tiny", fps=FPS, features=features, root=root, robot_type="panda")
    for index in range(len(LENGTHS)):
        episode = expected_episode(index)
        for f in range(LENGTHS[index]):
            frame = {"observation.state": episode["state"][f], "action": episode["action"][f], "task": episode["task"]}
            frame.update({f"observation.images.{camera}": episode["frames"][camera][f] for camera in CAMERAS})
            dataset.add_frame(frame)
        dataset.save_episode(parallel_encoding=False)
    dataset.finalize()


if __name__ == "__main__":
    write_fixture(sys.argv[1])
