"""Demonstration files written by other tools (plain h5py, not rsd's writer) train a tokenizer and a policy.

A LIBERO-layout file (`obs/<camera>_rgb`, LIBERO's proprio keys, `problem_info`, `macros_image_convention`) with
128×128 frames and two cameras, and a robomimic-layout file (`obs/<camera>_image`, robomimic's proprio keys, float32
actions, no instruction, no convention, no dones or rewards) are read through `DataSource` choices and trained on
for one epoch with the tiny presets.
"""

from __future__ import annotations

import dataclasses
import json

import h5py
import numpy as np
import pytest

from rsd.config import PolicyTrainConfig, TrainConfig
from rsd.data.source import DataSource
from rsd.errors import DataError
from rsd.models.main import MainModel
from rsd.presets import get_preset
from rsd.training.policy import train_policy
from rsd.training.tokenizer import train_tokenizer_from_file

EPISODES, STEPS = 6, 20


def _frames(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 256, size=(STEPS, size, size, 3), dtype=np.uint8)


def write_libero(path) -> None:
    """LIBERO's own layout, as LIBERO's create_dataset.py writes it."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as file:
        data = file.create_group("data")
        data.attrs["macros_image_convention"] = "opengl"
        data.attrs["problem_info"] = json.dumps({"language_instruction": "put the bowl on the plate"})
        for i in range(EPISODES):
            demo = data.create_group(f"demo_{i}")
            demo.create_dataset("actions", data=rng.uniform(-1, 1, (STEPS, 7)))
            demo.create_dataset("dones", data=np.eye(STEPS, dtype=np.uint8)[-1])
            demo.create_dataset("obs/agentview_rgb", data=_frames(rng, 128))
            demo.create_dataset("obs/eye_in_hand_rgb", data=_frames(rng, 128))
            for key, dims in (("ee_pos", 3), ("ee_ori", 3), ("gripper_states", 2), ("joint_states", 7)):
                demo.create_dataset(f"obs/{key}", data=rng.normal(size=(STEPS, dims)))


def write_robomimic(path) -> None:
    """robomimic's layout: `_image` cameras, robot0_* proprio, float32 actions, no instruction and no image convention."""
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as file:
        data = file.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {}})
        for i in range(EPISODES):
            demo = data.create_group(f"demo_{i}")
            demo.create_dataset("actions", data=rng.uniform(-1, 1, (STEPS, 7)).astype(np.float32))
            demo.create_dataset("obs/agentview_image", data=_frames(rng, 84))
            demo.create_dataset("obs/robot0_eye_in_hand_image", data=_frames(rng, 84))
            for key, dims in (("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2)):
                demo.create_dataset(f"obs/{key}", data=rng.normal(size=(STEPS, dims)))


def _train(source, root, preset: str) -> MainModel:
    spec = get_preset(preset)
    train_tokenizer_from_file(source.path, root / "tokenizer", train=TrainConfig(epochs=1, batch_size=64), progress=False)
    short = dataclasses.replace(spec.policy_train, epochs=1, batch_size=32, val_fraction=0.34)
    summary = train_policy(source, root / "tokenizer", root / "policy", preset, short, progress=False,
                           options=PolicyTrainConfig(select_by="val_l1", shift=0))
    main = MainModel.load(root / "policy")
    assert main.fingerprint == summary["fingerprint"] and summary["best"]["epoch"] == 1
    return main


@pytest.mark.slow
def test_a_libero_layout_file_with_two_128px_cameras_trains(tmp_path) -> None:
    path = tmp_path / "libero.hdf5"
    write_libero(path)
    main = _train(DataSource(str(path), cameras=("agentview",), image_size=64), tmp_path, "tiny")
    assert main.statistics.proprio.dim == 8 and main.dataset_key == "libero"


@pytest.mark.slow
def test_a_robomimic_layout_file_trains_once_told_what_the_file_does_not_say(tmp_path) -> None:
    path = tmp_path / "lift.hdf5"
    write_robomimic(path)
    with pytest.raises(DataError, match="--image-convention"):
        _train(DataSource(str(path)), tmp_path / "r1", "tiny-no-proprio")
    with pytest.raises(DataError, match="--instruction"):
        _train(DataSource(str(path), image_convention="opengl"), tmp_path / "r2", "tiny-no-proprio")
    source = DataSource(str(path), cameras=("agentview",), proprio_keys=(), image_size=64, image_convention="opengl",
                        instruction="lift the cube")
    main = _train(source, tmp_path, "tiny-no-proprio")
    assert main.vla.config.proprio_dim == 0 and main.statistics.proprio is None


@pytest.mark.slow
def test_the_command_line_reads_a_foreign_file_with_a_data_config(tmp_path) -> None:
    from click.testing import CliRunner

    from rsd.cli import main
    from rsd.training.features import load_features

    path = tmp_path / "lift.hdf5"
    write_robomimic(path)
    config = tmp_path / "lift.rsd.json"
    config.write_text(json.dumps({"cameras": ["agentview"], "proprio_keys": [], "image_convention": "opengl", "instruction": "lift it"}))
    runner = CliRunner()
    result = runner.invoke(main, ["train-tokenizer", "--data", str(path), "--out", str(tmp_path / "tokenizer"), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    base = ["train-policy", "--data", str(path), "--tokenizer", str(tmp_path / "tokenizer"), "--out", str(tmp_path / "policy"),
            "--preset", "tiny-no-proprio", "--epochs", "1", "--select-by", "val_l1"]
    result = runner.invoke(main, base)
    assert result.exit_code == 1 and "--image-convention" in result.output and not (tmp_path / "policy").exists()
    result = runner.invoke(main, [*base, "--data-config", str(config)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["collect-features", "--policy", str(tmp_path / "policy"), "--data", str(path), "--exit-layer", "3",
                                  "--out", str(tmp_path / "features"), "--data-config", str(config)])
    assert result.exit_code == 0, result.output
    assert load_features(tmp_path / "features").exit_hidden.shape[0] == EPISODES * STEPS
