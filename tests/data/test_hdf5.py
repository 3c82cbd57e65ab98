"""The LIBERO/robomimic HDF5 layout: round trip, a hand-built LIBERO file, demo ordering and bad files."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from rsd.data.actions import load_action_episodes
from rsd.data.dataset import Episode
from rsd.data.hdf5 import count_demos, read_demos, read_provenance, write_demos
from rsd.data.source import DataSource, read_episodes
from rsd.envs.demos import generate_demos
from rsd.errors import ConfigError, DataError


def make_episode(episode_id: int, steps: int = 5, instruction: str = "pick up the red block and place it on the plate") -> Episode:
    """A small random episode with one camera and 8-dim proprio."""
    rng = np.random.default_rng(episode_id)
    return Episode(
        episode_id,
        instruction,
        rng.uniform(-1, 1, size=(steps, 7)).astype(np.float32),
        {"agentview": rng.integers(0, 256, size=(steps, 8, 8, 3), dtype=np.uint8)},
        rng.uniform(-1, 1, size=(steps, 8)).astype(np.float32),
    )


def write_libero_file(path, demos=(0,), steps=4, convention="opengl", size=16, **overrides):
    """A file in LIBERO's exact layout, written by plain h5py: one instruction in problem_info, two cameras, four proprio keys.

    `convention=None` leaves out `macros_image_convention`, as robomimic's files do.
    """
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as file:
        data = file.create_group("data")
        if convention is not None:
            data.attrs["macros_image_convention"] = convention
        data.attrs["env_name"] = "Libero_Tabletop_Manipulation"
        data.attrs["problem_info"] = json.dumps({"problem_name": "libero_tabletop_manipulation", "domain_name": "robosuite",
                                                 "language_instruction": "pick up the black bowl and place it on the plate"})
        data.attrs["env_args"] = json.dumps({"type": 1, "env_name": "Libero_Tabletop_Manipulation", "env_kwargs": {}})
        data.attrs["bddl_file_name"] = "libero/bddl_files/libero_spatial/task.bddl"
        for index in demos:
            demo = data.create_group(f"demo_{index}")
            demo.attrs["num_samples"] = steps
            fields = {
                "actions": np.full((steps, 7), float(index)),
                "dones": np.eye(steps, dtype=np.uint8)[-1],
                "rewards": np.eye(steps, dtype=np.uint8)[-1],
                "obs/agentview_rgb": rng.integers(0, 256, size=(steps, size, size, 3), dtype=np.uint8),
                "obs/eye_in_hand_rgb": rng.integers(0, 256, size=(steps, size, size, 3), dtype=np.uint8),
                "obs/ee_pos": rng.normal(size=(steps, 3)),
                "obs/ee_ori": rng.normal(size=(steps, 3)),
                "obs/gripper_states": rng.normal(size=(steps, 2)),
                "obs/joint_states": rng.normal(size=(steps, 7)),
            }
            fields.update(overrides)
            for key, value in fields.items():
                if value is not None:
                    demo.create_dataset(key, data=value)


def test_round_trip_of_generated_episodes(tmp_path):
    path = tmp_path / "demos.hdf5"
    summary = generate_demos("tabletop", episodes=4, out=path, seed=0, progress=False)
    assert summary["episodes"] + summary["failed"] == 4 and summary["steps_per_second"] > 0
    episodes = read_demos(path)
    assert [e.episode_id for e in episodes] == list(range(summary["episodes"]))
    write_demos(tmp_path / "copy.hdf5", episodes, env_name="tabletop", env_kwargs={"image_size": 64})
    for a, b in zip(episodes, read_demos(tmp_path / "copy.hdf5"), strict=True):
        assert (a.episode_id, a.instruction) == (b.episode_id, b.instruction)
        assert np.array_equal(a.actions, b.actions) and np.array_equal(a.proprio, b.proprio)
        assert a.object_state.shape == (len(a), 8) and np.array_equal(a.object_state, b.object_state)
        assert a.images.keys() == b.images.keys() == {"agentview"}
        assert np.array_equal(a.images["agentview"], b.images["agentview"])
    with h5py.File(path, "r") as file:
        data = file["data"]
        assert json.loads(data.attrs["env_args"])["env_name"] == "tabletop"
        assert data.attrs["total"] == sum(len(e) for e in episodes)
        assert file["data/demo_0/dones"][-1] == 1 and file["data/demo_0/obs/ee_pos"].shape[1] == 3
        assert file["data/demo_0/obs/object"].shape == (len(episodes[0]), 8)


def test_robomimics_object_state_is_read_from_a_file_rsd_did_not_write(tmp_path):
    path = tmp_path / "robomimic.hdf5"
    write_libero_file(path, demos=(0, 1))
    assert read_demos(path)[0].object_state is None  # LIBERO's files record none
    with h5py.File(path, "a") as file:  # robomimic's obs/object: cube position, quaternion, gripper-to-cube (Lift)
        for index in (0, 1):
            file[f"data/demo_{index}/obs"].create_dataset("object", data=np.full((4, 10), float(index)))
    episodes = read_demos(path)
    assert [e.object_state.shape for e in episodes] == [(4, 10), (4, 10)] and episodes[1].object_state.dtype == np.float32
    assert np.all(episodes[1].object_state == 1.0)
    with h5py.File(path, "a") as file:
        del file["data/demo_1/obs/object"]
        file["data/demo_1/obs"].create_dataset("object", data=np.zeros((3, 10)))
    with pytest.raises(DataError, match="demo_1/obs/object"):
        read_demos(path)


def test_mixed_instructions_are_kept_per_episode(tmp_path):
    episodes = [make_episode(0, instruction="put the red block next to the blue block"), make_episode(1)]
    write_demos(tmp_path / "mixed.hdf5", episodes, env_name="tabletop")
    assert [e.instruction for e in read_demos(tmp_path / "mixed.hdf5")] == [e.instruction for e in episodes]


def test_libero_layout_file_loads(tmp_path):
    path = tmp_path / "libero.hdf5"
    write_libero_file(path)
    (episode,) = read_demos(path)
    assert episode.instruction == "pick up the black bowl and place it on the plate"
    assert episode.cameras == ["agentview", "eye_in_hand"]
    assert episode.proprio.shape == (4, 8) and episode.actions.dtype == np.float32
    only = read_demos(path, cameras=["agentview"], proprio_keys=["joint_states"])[0]
    assert only.cameras == ["agentview"] and only.proprio.shape == (4, 7)
    with h5py.File(path, "r") as file:  # robosuite's frames are upside down; read them as the adapters see them
        raw = file["data/demo_0/obs/agentview_rgb"][()]
    assert np.array_equal(episode.images["agentview"], raw[:, ::-1, ::-1])
    assert np.array_equal(read_episodes(DataSource(str(path), image_convention="opencv"))[0].images["agentview"], raw)
    with pytest.raises(DataError, match="wrist"):
        read_demos(path, cameras=["wrist"])
    assert read_provenance(path) == []  # LIBERO's own files do not say how they were made
    with h5py.File(path, "a") as file:
        file["data"].attrs["rsd_provenance"] = "{not json"
    with pytest.raises(DataError, match="rsd_provenance"):
        read_provenance(path)


def test_libero_recorded_gripper_becomes_the_libero_envs_units(tmp_path):
    """LIBERO records its controller's gripper (-1 open / +1 close); rsd's LIBERO env takes OpenVLA's 1 open / 0 closed."""
    from rsd.envs.sim_common import libero_env_action

    recorded = np.zeros((4, 7))
    recorded[:, :6] = np.arange(24).reshape(4, 6) / 8
    recorded[:, 6] = [-1.0, -1.0, 1.0, 1.0]  # open, open, close, close
    path = tmp_path / "libero.hdf5"
    write_libero_file(path, actions=recorded)
    (episode,) = read_demos(path)
    assert episode.actions[:, 6].tolist() == [1.0, 1.0, 0.0, 0.0] and np.array_equal(episode.actions[:, :6], recorded[:, :6])
    (actions,), _ = load_action_episodes(path)  # train-tokenizer's reader sees the same units as train-policy's
    assert np.array_equal(actions, episode.actions)
    assert np.array_equal(libero_env_action(episode.actions), recorded)  # the env hands LIBERO's controller what was recorded
    with h5py.File(path, "a") as file:  # OpenVLA's no-noops regeneration keeps no file attrs at all
        for key in list(file["data"].attrs):
            del file["data"].attrs[key]
    no_attrs = read_demos(path, image_convention="opengl", instruction="pick up the black bowl")
    assert no_attrs[0].actions[:, 6].tolist() == [1.0, 1.0, 0.0, 0.0]
    for env_name, gripper in (("tabletop", [-1.0, -1.0, 1.0, 1.0]), ("libero:libero_spatial/0", [1.0, 1.0, 0.0, 0.0])):
        episode = make_episode(0, steps=4)  # rsd's own files hold the units their env takes: read as written
        episode.actions[:, 6] = gripper
        write_demos(tmp_path / "rsd.hdf5", [episode], env_name=env_name)
        assert read_demos(tmp_path / "rsd.hdf5")[0].actions[:, 6].tolist() == gripper


def test_an_unrecorded_image_convention_is_refused_not_guessed(tmp_path):
    path = tmp_path / "robomimic.hdf5"
    write_libero_file(path, convention=None)
    with pytest.raises(DataError, match="--image-convention") as error:
        read_demos(path)
    assert "macros_image_convention" in str(error.value)
    with h5py.File(path, "r") as file:
        raw = file["data/demo_0/obs/agentview_rgb"][()]
    assert np.array_equal(read_episodes(DataSource(str(path), image_convention="opengl"))[0].images["agentview"], raw[:, ::-1, ::-1])
    write_libero_file(path, convention="upside-down")
    with pytest.raises(DataError, match="'upside-down'"):
        read_demos(path)


def test_missing_proprio_keys_are_named_and_can_be_chosen(tmp_path):
    path = tmp_path / "lift.hdf5"
    write_libero_file(path, **{"obs/ee_ori": None})
    with pytest.raises(DataError, match=r"missing \['ee_ori'\].*--proprio-keys"):
        read_demos(path)
    assert read_episodes(DataSource(str(path), proprio_keys=()))[0].proprio is None
    assert read_episodes(DataSource(str(path), proprio_keys=("ee_pos", "gripper_states")))[0].proprio.shape == (4, 5)


def test_frames_are_resized_and_cameras_chosen(tmp_path):
    path = tmp_path / "big.hdf5"
    write_libero_file(path, size=128)
    (episode,) = read_episodes(DataSource(str(path), cameras=("agentview",), image_size=64))
    assert episode.cameras == ["agentview"] and episode.images["agentview"].shape == (4, 64, 64, 3)
    assert episode.images["agentview"].dtype == np.uint8
    flat = tmp_path / "flat.hdf5"
    write_libero_file(flat, size=128, **{"obs/agentview_rgb": np.full((4, 128, 128, 3), 77, np.uint8)})
    assert (read_episodes(DataSource(str(flat), image_size=64))[0].images["agentview"] == 77).all()


def test_per_dataset_config_file(tmp_path):
    config = tmp_path / "lift.rsd.json"
    config.write_text(json.dumps({"cameras": ["agentview"], "proprio_keys": [], "image_convention": "opengl", "image_size": 32}))
    source = DataSource.from_config(tmp_path / "lift.hdf5", config, image_size=64)
    assert source == DataSource(str(tmp_path / "lift.hdf5"), cameras=("agentview",), proprio_keys=(), image_size=64,
                                image_convention="opengl")
    config.write_text(json.dumps({"camera": ["agentview"]}))
    with pytest.raises(ConfigError, match="camera"):
        DataSource.from_config(tmp_path / "lift.hdf5", config)
    with pytest.raises(ConfigError, match="image_convention"):
        DataSource("x.hdf5", image_convention="upright")


@pytest.mark.parametrize("content", [b"", b"not an hdf5 file at all", "truncated"])
def test_unreadable_files_are_data_errors(tmp_path, content):
    path = tmp_path / "bad.hdf5"
    if content == "truncated":
        write_libero_file(tmp_path / "good.hdf5", steps=200, size=64)
        path.write_bytes((tmp_path / "good.hdf5").read_bytes()[:60_000])
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match="bad.hdf5.*HDF5"):
        read_episodes(DataSource(str(path), image_convention="opencv"))
    with pytest.raises(DataError, match="bad.hdf5.*HDF5"):
        load_action_episodes(path)


def test_nan_proprio_is_named(tmp_path):
    path = tmp_path / "nan.hdf5"
    write_libero_file(path, **{"obs/ee_pos": np.full((4, 3), np.nan)})
    with pytest.raises(DataError, match="finite proprio.*step 0, dim 0"):
        read_demos(path)


def test_demos_are_sorted_by_number(tmp_path):
    path = tmp_path / "many.hdf5"
    write_libero_file(path, demos=(10, 2, 9, 0, 1))
    episodes = read_demos(path)
    assert [e.episode_id for e in episodes] == [0, 1, 2, 9, 10]
    assert [float(e.actions[0, 0]) for e in episodes] == [0.0, 1.0, 2.0, 9.0, 10.0]


def test_the_first_episodes_are_read_in_numeric_order_and_counted_without_reading(tmp_path):
    path = tmp_path / "many.hdf5"
    write_libero_file(path, demos=(10, 2, 9, 0, 1))
    assert count_demos(path) == 5
    assert [e.episode_id for e in read_demos(path, first=3)] == [0, 1, 2]
    assert [e.episode_id for e in read_demos(path, first=9)] == [0, 1, 2, 9, 10]
    with pytest.raises(DataError, match="expected first >= 1 episodes to read"):
        read_demos(path, first=0)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"actions": None}, "actions"),
        ({"actions": np.zeros(4)}, "actions"),
        ({"obs/ee_pos": np.zeros((3, 3))}, "obs/ee_pos"),
        ({"obs/agentview_rgb": np.zeros((3, 16, 16, 3), dtype=np.uint8)}, "obs/agentview_rgb"),
        ({"obs/agentview_rgb": None, "obs/eye_in_hand_rgb": None}, "_rgb"),
    ],
)
def test_bad_files_name_the_key(tmp_path, overrides, key):
    path = tmp_path / "bad.hdf5"
    write_libero_file(path, **overrides)
    with pytest.raises(DataError, match=key) as error:
        read_demos(path)
    assert "bad.hdf5" in str(error.value)


def test_missing_data_group_and_instruction(tmp_path):
    with h5py.File(tmp_path / "empty.hdf5", "w") as file:
        file.create_group("other")
    with pytest.raises(DataError, match="'data'"):
        read_demos(tmp_path / "empty.hdf5")
    path = tmp_path / "noinstr.hdf5"
    write_libero_file(path)
    with h5py.File(path, "a") as file:
        del file["data"].attrs["problem_info"]
    with pytest.raises(DataError, match="language_instruction"):
        read_demos(path)
    with pytest.raises(DataError, match="no such file"):
        read_demos(tmp_path / "missing.hdf5")
