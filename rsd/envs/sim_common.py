"""Observation and action plumbing shared by the robosuite and LIBERO adapters (pure numpy; no simulator import).

LIBERO's environments are robosuite environments, so both adapters turn a raw robosuite observation into the
contract's observation dict the same way: camera frames rotated 180° (`img[::-1, ::-1]`, which turns robosuite's
OpenGL-convention frames upright, as OpenVLA-OFT does for LIBERO; a robosuite-trained policy sees the same view),
brought to the policy's size, proprio = end-effector position (3) + axis-angle from the quaternion (3) + gripper
finger positions (2). On the action side LIBERO's evaluation protocol (OpenVLA-OFT) maps the policy's gripper
value from [0, 1] to [-1, 1], binarises it and flips its sign for LIBERO's controller (-1 open, +1 close).

Resize: OpenVLA-OFT encodes each frame as JPEG, decodes it and resizes with TensorFlow's antialiased Lanczos-3
kernel. TensorFlow is not a dependency here, so `resize_image` does the same with Pillow (JPEG quality 95, 4:2:0
chroma subsampling — TF's defaults — and Pillow's LANCZOS filter, which is antialiased for downscaling); results
agree with TF to a few grey levels, not bit for bit. OpenVLA-OFT's 90 % centre crop is not applied here: it belongs
to the model (`VLAConfig.center_crop`, done once by `rsd.models.processor`), so it can never be applied twice.

Usage:
    pipeline = ImagePipeline(size=224, rotate=True, jpeg=True)
    image = pipeline(raw_obs["agentview_image"])                  # uint8 [224, 224, 3]
    env_action = libero_env_action(policy_action)                  # [7], gripper in {-1, 0, +1}
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rsd.data.stats import DatasetStatistics, read_dataset_statistics
from rsd.data.video import resize_frame
from rsd.envs.rotations import quat2axisangle
from rsd.errors import ConfigError, DataError, ShapeError

ACTION_DIM = 7  # xyz delta, axis-angle delta, gripper
PROPRIO_DIM = 8  # eef pos (3) + axis-angle (3) + gripper qpos (2)
JPEG_QUALITY = 95  # tf.image.encode_jpeg's default quality

# robosuite observation keys (robot 0) and camera keys
EEF_POS_KEY = "robot0_eef_pos"
EEF_QUAT_KEY = "robot0_eef_quat"
GRIPPER_QPOS_KEY = "robot0_gripper_qpos"


@contextlib.contextmanager
def numpy_seed(seed: int) -> Iterator[None]:
    """Seed numpy's global RNG (robosuite and LIBERO sample from it) inside the block; restore the caller's state after."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def camera_key(camera: str) -> str:
    """The robosuite observation key of a camera's RGB frame, e.g. `agentview_image`."""
    return f"{camera}_image"


def check_frame(image: np.ndarray, what: str = "image") -> np.ndarray:
    """Return `image` as a uint8 `[H, W, 3]` array, or raise a ShapeError naming what arrived."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ShapeError(f"{what}: expected uint8 [H, W, 3], got {array.dtype} {array.shape}.")
    return array


def rotate_180(image: np.ndarray) -> np.ndarray:
    """Rotate a frame `[H, W, 3]` by 180° (`img[::-1, ::-1]`), as LIBERO/OpenVLA-OFT do for both cameras."""
    return np.ascontiguousarray(check_frame(image)[::-1, ::-1])


def jpeg_roundtrip(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """Encode a frame `[H, W, 3]` as JPEG and decode it again (the RLDS builder stores JPEGs)."""
    buffer = io.BytesIO()
    Image.fromarray(check_frame(image)).save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.uint8)


def resize_image(image: np.ndarray, size: int, jpeg: bool = True) -> np.ndarray:
    """OpenVLA-OFT's `resize_image_for_policy`: optional JPEG round trip, then Lanczos resize to `[size, size, 3]`.

    The round trip happens even when the frame already has the target size (OFT does it for every frame).
    """
    if size <= 0:
        raise ConfigError(f"resize_image: expected size > 0, got {size}.")
    return resize_frame(jpeg_roundtrip(image) if jpeg else check_frame(image), size)


@dataclass(frozen=True)
class ImagePipeline:
    """The per-frame preprocessing both adapters apply: rotate 180°, then resize (the centre crop is the model's)."""

    size: int  # side of the square frame handed to the policy
    rotate: bool = True  # rotate 180° (robosuite renders upside down; LIBERO/OFT rotate both cameras)
    jpeg: bool = True  # JPEG round trip before the resize (OpenVLA-OFT); False: plain Lanczos, no-op at equal size

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ConfigError(f"ImagePipeline.size: expected an int > 0, got {self.size}.")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One raw frame `[h, w, 3]` uint8 -> the policy's frame `[size, size, 3]` uint8."""
        frame = rotate_180(image) if self.rotate else check_frame(image)
        return resize_image(frame, self.size, jpeg=self.jpeg)


def proprio_from_obs(raw: Mapping[str, Any]) -> np.ndarray:
    """Proprio float32 `[8]` from a robosuite observation: eef pos (3) + axis-angle (3) + gripper qpos (2)."""
    missing = [k for k in (EEF_POS_KEY, EEF_QUAT_KEY, GRIPPER_QPOS_KEY) if k not in raw]
    if missing:
        raise DataError(f"robosuite observation: expected proprio keys {missing}, got keys {sorted(raw)}.")
    proprio = np.concatenate(
        [np.asarray(raw[EEF_POS_KEY], dtype=np.float64), quat2axisangle(raw[EEF_QUAT_KEY]), np.asarray(raw[GRIPPER_QPOS_KEY], dtype=np.float64)]
    ).astype(np.float32)
    if proprio.shape != (PROPRIO_DIM,):
        raise DataError(f"robosuite observation: expected proprio of size {PROPRIO_DIM}, got {proprio.shape}.")
    return proprio


def build_observation(raw: Mapping[str, Any], cameras: Sequence[str], pipeline: ImagePipeline, instruction: str) -> dict[str, Any]:
    """The contract's observation dict from a raw robosuite observation.

    Returns `{"image": uint8 [S, S, 3] (one camera) or a list of them, "instruction": str, "proprio": float32 [8]}`.
    """
    frames = []
    for camera in cameras:
        key = camera_key(camera)
        if key not in raw:
            raise DataError(f"robosuite observation: expected camera frame {key!r}, got keys {sorted(raw)}.")
        frames.append(pipeline(raw[key]))
    return {"image": frames[0] if len(frames) == 1 else frames, "instruction": instruction, "proprio": proprio_from_obs(raw)}


def check_action(action: Any, dim: int = ACTION_DIM) -> np.ndarray:
    """Return `action` as a finite float64 `[dim]` array, or raise a ShapeError naming what arrived."""
    array = np.asarray(action, dtype=np.float64)
    if array.shape != (dim,):
        raise ShapeError(f"env.step: expected an action [{dim}], got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ShapeError(f"env.step: expected a finite action, got {array.tolist()}.")
    return array


def step_outcome(steps: int, max_steps: int, success: bool) -> tuple[bool, dict[str, Any]]:
    """`done` and `info` after `steps` steps: an episode ends on success, or without it at `max_steps` (a timeout)."""
    timeout = steps >= max_steps and not success
    return success or timeout, {"success": success, "timeout": timeout, "step": steps}


def normalize_gripper_action(action: np.ndarray, binarize: bool = True) -> np.ndarray:
    """Map the last dimension from [0, 1] to [-1, 1] (`2x - 1`), then optionally `sign()` it; `[..., A]` -> copy.

    As in OpenVLA-OFT, a value of exactly 0.5 binarises to 0 (the controller then leaves the gripper as it is).
    """
    out = np.array(action, dtype=np.float64, copy=True)
    out[..., -1] = 2.0 * out[..., -1] - 1.0
    if binarize:
        out[..., -1] = np.sign(out[..., -1])
    return out


def invert_gripper_action(action: np.ndarray) -> np.ndarray:
    """Flip the sign of the last dimension (RLDS: 0 close / 1 open; LIBERO's controller: -1 open / +1 close)."""
    out = np.array(action, dtype=np.float64, copy=True)
    out[..., -1] *= -1.0
    return out


def libero_env_action(action: np.ndarray) -> np.ndarray:
    """A policy action in OpenVLA's LIBERO units `[..., 7]` (gripper in [0, 1]) -> LIBERO controller action."""
    return invert_gripper_action(normalize_gripper_action(action, binarize=True))


# Evaluation protocol constants (OpenVLA-OFT's run_libero_eval.py)
LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
LIBERO_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
LIBERO_SETTLE_STEPS = 10  # no-op steps after reset so that objects settle
LIBERO_DUMMY_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # controller units: no motion, gripper open
LIBERO_RENDER_SIZE = 256  # OffScreenRenderEnv camera resolution used for evaluation
LIBERO_POLICY_SIZE = 224  # policy input resolution


def check_suite(suite: str) -> str:
    """Return `suite` if it is one of LIBERO's evaluation suites, else a ConfigError listing them."""
    if suite not in LIBERO_SUITES:
        raise ConfigError(f"LIBERO suite: expected one of {list(LIBERO_SUITES)}, got {suite!r}.")
    return suite


def check_statistics_key(suite: str, key: str) -> str:
    """Refuse an un-normalisation key that does not belong to `suite` (e.g. `libero_object_no_noops` for spatial)."""
    check_suite(suite)
    allowed = (suite, f"{suite}_no_noops")
    if key not in allowed:
        raise ConfigError(
            f"statistics key for {suite}: expected one of {list(allowed)}, got {key!r}. Actions un-normalised with "
            "another dataset's statistics are wrong (docs/pitfalls.md #6); pass the suite's own key."
        )
    return key


def select_statistics_key(suite: str, available: Sequence[str]) -> str:
    """The suite's key among a `dataset_statistics.json`'s keys: `suite`, else `suite_no_noops`; none is an error."""
    check_suite(suite)
    keys = list(available)
    for key in (suite, f"{suite}_no_noops"):
        if key in keys:
            return key
    raise DataError(
        f"dataset statistics: expected key {suite!r} or {suite + '_no_noops'!r}, found {sorted(keys)}. "
        "Use the statistics the policy was trained with for this suite; no other key is substituted."
    )


def load_suite_statistics(path: str | Path, suite: str, key: str | None = None) -> DatasetStatistics:
    """Read the suite's entry of an OpenVLA `dataset_statistics.json` (key checked or selected; never guessed).

    Un-normalise a policy's `[-1, 1]` chunk with `rsd.data.stats.unnormalize(chunk, stats.action)`.
    """
    data = json.loads(Path(path).read_text())
    chosen = check_statistics_key(suite, key) if key is not None else select_statistics_key(suite, list(data))
    return read_dataset_statistics(path, chosen)
