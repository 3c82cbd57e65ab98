"""The real simulators: LIBERO's benchmark from the installed package, robosuite Lift demos and evaluation.

Every test is marked `sim` and skips, saying why, where robosuite, LIBERO or an offscreen OpenGL context is
missing. Run: `python -m pytest -q -m sim tests/test_sim.py` in an environment with the [sim]/[libero] extras
and `MUJOCO_GL=egl` (or `osmesa` with Debian's libosmesa6). A LIBERO episode also needs the scene assets, which
the [libero] extra installs (or `RSD_LIBERO_ASSETS=DIR`); tests/test_libero.py has the expert and demo tests.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

pytestmark = pytest.mark.sim

LIBERO_SPATIAL_FIRST = "pick up the black bowl between the plate and the ramekin and place it on the plate"


def _needs(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs {module} (pip install -e '.[{extra}]'); not installed here")


@pytest.fixture(scope="module")
def rendering() -> None:
    """Skip unless robosuite imports and an offscreen OpenGL context opens (MUJOCO_GL=egl or osmesa)."""
    _needs("robosuite", "sim")
    from rsd.envs.robosuite import import_robosuite

    import_robosuite()
    import mujoco

    try:
        context = mujoco.GLContext(16, 16)
    except (AttributeError, RuntimeError, OSError) as error:  # what mujoco raises when the GL backend cannot load
        pytest.skip(f"needs an offscreen OpenGL context (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): {error!r}")
    context.free()


def test_libero_spatial_lists_ten_tasks_with_init_states():
    _needs("libero", "libero")
    from rsd.envs.libero import list_tasks

    tasks = list_tasks("libero_spatial")
    assert len(tasks) == 10
    assert tasks[0][1] == LIBERO_SPATIAL_FIRST
    assert all(name and instruction and states == 50 for name, instruction, states in tasks)


def test_libero_without_assets_says_how_to_get_them(tmp_path):
    _needs("libero", "libero")
    from rsd.envs.libero import make_libero_env
    from rsd.envs.libero_assets import LiberoAssetsError

    with pytest.raises(LiberoAssetsError, match=r"expected folders .*scenes.* missing"):
        make_libero_env("libero_spatial/0", assets=tmp_path)


def test_libero_episode_follows_the_protocol(rendering):
    _needs("libero", "libero")
    from rsd.envs.libero import make_libero_env, resolve_assets
    from rsd.envs.libero_assets import LiberoAssetsError

    try:
        resolve_assets()
    except LiberoAssetsError as error:
        pytest.skip(f"needs LIBERO's scene assets (pip install -e '.[libero]' installs them): {error}")
    env = make_libero_env("libero_spatial/0", cameras=("agentview", "robot0_eye_in_hand"))
    obs = env.reset(0)
    assert env.max_steps == 220 and env.instruction == LIBERO_SPATIAL_FIRST and env.statistics_key == "libero_spatial_no_noops"
    assert [frame.shape for frame in obs["image"]] == [(224, 224, 3)] * 2 and obs["proprio"].shape == (8,)
    obs, _, done, info = env.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))  # gripper 1 = open in the policy's units
    assert not done and not info["success"] and info["step"] == 1
    env.close()


def test_lift_expert_demo_is_written_in_the_demo_format(rendering, tmp_path):
    from rsd.data.hdf5 import read_demos
    from rsd.envs.demos import generate_demos
    from rsd.envs.robosuite import RobosuiteEnv

    summary = generate_demos("robosuite:Lift", episodes=1, out=tmp_path / "lift.hdf5", image_size=64, progress=False)
    assert summary["episodes"] == 1 and summary["failed"] == 0 and summary["steps"] > 0
    (episode,) = read_demos(tmp_path / "lift.hdf5")
    steps = summary["steps"]
    assert episode.instruction == "lift the red cube"
    assert episode.images["agentview"].shape == (steps, 64, 64, 3)
    assert episode.actions.shape == (steps, 7) and episode.proprio.shape == (steps, 8)
    env = RobosuiteEnv("Lift", image_size=64)
    first = env.reset(0)
    env.close()
    assert np.array_equal(episode.images["agentview"][0], first["image"])  # stored upright, read back unrotated
    assert np.allclose(episode.proprio[0], first["proprio"])


def test_lift_expert_lifts_a_cube_lying_at_45_degrees_without_turning():
    _needs("robosuite", "sim")
    from rsd.envs.robosuite import RobosuiteEnv
    from rsd.envs.robosuite_expert import RobosuiteExpert
    from rsd.envs.rotations import face_yaw_offset, yaw

    env = RobosuiteEnv("Lift", cameras=())  # state only: the expert reads the simulator
    for seed in (2, 7):  # the cube lies 44-45° off the fingers' axis on these seeds
        obs = env.reset(seed=seed)
        _, cube = env.body_pose(env.raw_env.cube_body_id)
        _, start = env.eef_pose()
        offset = np.degrees(face_yaw_offset(cube, start))
        assert abs(offset) > 40
        expert = RobosuiteExpert(env)
        success, turned = False, 0.0
        for _ in range(150):
            obs, _, _, info = env.step(expert.act(obs))
            turned = max(turned, abs(np.degrees((yaw(env.eef_pose()[1]) - yaw(start) + np.pi) % (2 * np.pi) - np.pi)))
            if info["success"]:
                success = True
                break
        assert success and turned < 5, (seed, success, turned)
    env.close()


def test_robosuite_seed_plays_the_same_alone_and_after_another_episode():
    _needs("robosuite", "sim")
    from rsd.envs.robosuite import RobosuiteEnv
    from rsd.envs.robosuite_expert import RobosuiteExpert

    def proprio_trajectory(env: RobosuiteEnv, seed: int, steps: int) -> np.ndarray:
        obs = env.reset(seed=seed)
        expert = RobosuiteExpert(env)
        rows = [obs["proprio"]]
        for _ in range(steps):
            obs, *_ = env.step(expert.act(obs))
            rows.append(obs["proprio"])
        return np.stack(rows)

    fresh = RobosuiteEnv("Lift", cameras=())
    alone = proprio_trajectory(fresh, 10010, 20)
    fresh.close()
    env = RobosuiteEnv("Lift", cameras=())
    proprio_trajectory(env, 10009, 60)  # ends with the gripper closed on a lifted cube
    assert np.array_equal(proprio_trajectory(env, 10010, 20), alone)
    env.close()


def test_policy_evaluates_two_robosuite_episodes(rendering):
    evaluate_module = pytest.importorskip("rsd.envs.evaluate", reason="rsd.envs.evaluate is not in this checkout yet")
    policy_module = pytest.importorskip("rsd.runtime.policy", reason="rsd.runtime.policy is not in this checkout yet")
    from conftest import make_tiny_main

    from rsd.envs.robosuite import make_robosuite_env

    env = make_robosuite_env("Lift", image_size=64, max_steps=10)  # the tiny model takes 64×64 frames
    report = evaluate_module.evaluate(policy_module.MainOnlyPolicy(make_tiny_main()), env, seeds=[0, 1], progress=False)
    env.close()
    assert [e.seed for e in report.episodes] == [0, 1]
    assert all(e.length == 10 and e.task_family == "Lift" and e.instruction == "lift the red cube" for e in report.episodes)


class FakeLiberoSim:
    """Stands in for `OffScreenRenderEnv` (which needs the scene assets): records calls, succeeds on a chosen step."""

    def __init__(self, bddl_file_name: str, camera_names: list, camera_heights: int, camera_widths: int) -> None:
        self.bddl, self.cameras, self.size = bddl_file_name, camera_names, camera_heights
        self.actions: list[list[float]] = []
        self.init_state = None
        self.succeed_after = 10**9

    def _obs(self) -> dict:
        frame = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        frame[: self.size // 2, : self.size // 2, 0] = 255  # red top-left, as rendered
        obs = {f"{c}_image": frame for c in self.cameras}
        return {**obs, "robot0_eef_pos": np.zeros(3), "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]), "robot0_gripper_qpos": np.zeros(2)}

    def seed(self, seed: int) -> None:
        np.random.seed(seed)

    def reset(self) -> dict:
        self.actions = []
        return self._obs()

    def set_init_state(self, state: np.ndarray) -> dict:
        self.init_state = state
        return self._obs()

    def step(self, action: list) -> tuple:
        self.actions.append(list(action))
        done = len(self.actions) >= self.succeed_after
        return self._obs(), float(done), done, {}

    def close(self) -> None:
        pass


def test_libero_env_protocol_on_a_stand_in_simulator(tmp_path, monkeypatch):
    _needs("libero", "libero")
    _needs("robosuite", "sim")
    import importlib

    from rsd.envs.libero import import_libero, load_init_states, make_libero_env
    from rsd.envs.libero_assets import ASSET_DIRS

    import_libero()  # writes LIBERO's config first, so its import does not ask on stdin
    envs = importlib.import_module("libero.libero.envs")
    monkeypatch.setattr(envs, "OffScreenRenderEnv", FakeLiberoSim)
    for name in ASSET_DIRS:
        (tmp_path / name).mkdir()
    env = make_libero_env("libero_spatial/3", assets=tmp_path)
    sim = env._env
    obs = env.reset(7)
    assert sim.size == 256 and sim.bddl.endswith(".bddl") and "libero_spatial" in sim.bddl
    assert np.array_equal(sim.init_state, load_init_states(env.tasks[3])[7])
    assert sim.actions == [[0.0] * 6 + [-1.0]] * 10  # the settle steps
    assert obs["image"].shape == (224, 224, 3) and obs["image"][200, 200, 0] > 200  # rotated 180°, resized
    assert env.task_family == "libero_spatial/3" and env.max_steps == 220
    _, _, done, info = env.step(np.array([0.1, 0, 0, 0, 0, 0, 0.0]))  # policy gripper 0 = close
    assert sim.actions[-1] == [0.1, 0, 0, 0, 0, 0, 1.0] and not done  # LIBERO +1 = close
    sim.succeed_after = len(sim.actions) + 1
    _, _, done, info = env.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))
    assert done and info["success"] and sim.actions[-1][-1] == -1.0
    sim.succeed_after = 10**9
    env.reset(0)
    for _ in range(219):
        _, _, done, info = env.step(np.zeros(7))
        assert not done
    _, _, done, info = env.step(np.zeros(7))
    assert done and info["timeout"] and not info["success"]
    suite = make_libero_env("libero_spatial", assets=tmp_path)
    suite.reset(2 * 50 + 5)
    assert suite.task_family == "libero_spatial/2" and np.array_equal(suite._env.init_state, load_init_states(suite.tasks[2])[5])
