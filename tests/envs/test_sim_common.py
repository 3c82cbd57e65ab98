"""The simulator-independent half of the LIBERO/robosuite protocol on fixed inputs (pure numpy: runs in CI).

Expected values are worked by hand from OpenVLA-OFT's code (`run_libero_eval.py`, `robot_utils.py`): rotate
`img[::-1, ::-1]`, `tf.image.crop_and_resize` bilinear sampling, `convert_image_dtype` truncation, gripper
`2x - 1` -> `sign` -> `* -1`, and robosuite's `quat2axisangle`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from rsd.envs.libero import make_libero_env
from rsd.envs.sim_common import (
    LIBERO_DUMMY_ACTION,
    LIBERO_MAX_STEPS,
    ImagePipeline,
    build_observation,
    check_statistics_key,
    jpeg_roundtrip,
    libero_env_action,
    normalize_gripper_action,
    proprio_from_obs,
    resize_image,
    rotate_180,
    select_statistics_key,
)
from rsd.errors import ConfigError, DataError, ShapeError


def quadrant_image(side: int = 256) -> np.ndarray:
    """Top-left quadrant red, the rest black: shows where a rotation moved it."""
    image = np.zeros((side, side, 3), dtype=np.uint8)
    image[: side // 2, : side // 2, 0] = 255
    return image


def test_rotate_180_flips_both_axes():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    rotated = rotate_180(image)
    assert rotated.tolist() == image[::-1, ::-1].tolist()
    assert rotated[0, 0].tolist() == image[1, 2].tolist()
    with pytest.raises(ShapeError):
        rotate_180(np.zeros((4, 4), dtype=np.uint8))


def test_resize_keeps_constant_colour_and_shape():
    image = np.full((256, 256, 3), (200, 40, 90), dtype=np.uint8)
    out = resize_image(image, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - (200, 40, 90)).max() <= 2  # JPEG's colour conversion moves flat colours by a grey level or two


def test_resize_runs_jpeg_even_at_the_target_size():
    noise = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    assert np.array_equal(resize_image(noise, 32, jpeg=False), noise)
    assert np.array_equal(resize_image(noise, 32, jpeg=True), jpeg_roundtrip(noise))
    assert not np.array_equal(jpeg_roundtrip(noise), noise)  # lossy, as in OFT's resize_image_for_policy


def test_pipeline_rotates_before_resizing():
    pipeline = ImagePipeline(size=224, rotate=True, jpeg=True)
    out = pipeline(quadrant_image())
    assert out.shape == (224, 224, 3)
    assert out[200, 200, 0] > 200 and out[20, 20, 0] < 50  # red moved from top-left to bottom-right


def test_proprio_is_eef_pos_axis_angle_gripper_qpos():
    half = math.sqrt(0.5)
    raw = {"robot0_eef_pos": [0.1, 0.2, 0.3], "robot0_eef_quat": [half, 0.0, 0.0, half], "robot0_gripper_qpos": [0.04, -0.04]}
    proprio = proprio_from_obs(raw)
    assert proprio.dtype == np.float32
    assert np.allclose(proprio, [0.1, 0.2, 0.3, math.pi / 2, 0.0, 0.0, 0.04, -0.04])
    with pytest.raises(DataError):
        proprio_from_obs({"robot0_eef_pos": [0, 0, 0]})


def test_observation_has_one_frame_or_a_list():
    raw = {"agentview_image": quadrant_image(8), "robot0_eye_in_hand_image": quadrant_image(8),
           "robot0_eef_pos": [0, 0, 0], "robot0_eef_quat": [0, 0, 0, 1], "robot0_gripper_qpos": [0, 0]}
    pipeline = ImagePipeline(size=8, jpeg=False)
    one = build_observation(raw, ["agentview"], pipeline, "lift")
    two = build_observation(raw, ["agentview", "robot0_eye_in_hand"], pipeline, "lift")
    assert one["image"].shape == (8, 8, 3) and one["instruction"] == "lift" and one["proprio"].shape == (8,)
    assert isinstance(two["image"], list) and len(two["image"]) == 2


def test_gripper_mapping_binarise_invert():
    actions = np.array([[0.1, 0.2, 0.3, 0.0, 0.0, 0.0, g] for g in (0.0, 0.3, 0.5, 0.7, 1.0)])
    assert normalize_gripper_action(actions, binarize=False)[:, -1].tolist() == pytest.approx([-1.0, -0.4, 0.0, 0.4, 1.0])
    assert normalize_gripper_action(actions)[:, -1].tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]
    env_actions = libero_env_action(actions)
    assert env_actions[:, -1].tolist() == [1.0, 1.0, -0.0, -1.0, -1.0]  # RLDS 0 = close -> LIBERO +1 = close
    assert np.array_equal(env_actions[:, :6], actions[:, :6])
    assert actions[0, -1] == 0.0  # input untouched


def test_protocol_constants():
    assert LIBERO_MAX_STEPS == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
    assert LIBERO_DUMMY_ACTION == (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def test_statistics_key_is_the_suites_own():
    assert select_statistics_key("libero_spatial", ["libero_object_no_noops", "libero_spatial_no_noops"]) == "libero_spatial_no_noops"
    with pytest.raises(DataError):
        select_statistics_key("libero_spatial", ["libero_object_no_noops"])
    with pytest.raises(ConfigError):
        check_statistics_key("libero_spatial", "libero_object_no_noops")


def test_libero_names_are_checked_before_the_simulator_loads():
    with pytest.raises(ConfigError, match="suite"):
        make_libero_env("libero_spatail/0")
    with pytest.raises(ConfigError, match="integer task id"):
        make_libero_env("libero_spatial/x")
    with pytest.raises(ConfigError, match="unknown"):
        make_libero_env("libero_spatial/0", fps=10)
