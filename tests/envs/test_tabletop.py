"""The tabletop world: deterministic per seed, solvable by the scripted expert, visible gripper."""

from __future__ import annotations

import numpy as np
import pytest

from rsd.envs.base import make_env
from rsd.envs.expert import ScriptedExpert
from rsd.envs.tabletop import TabletopEnv
from rsd.errors import ConfigError, ShapeError


def rollout(env: TabletopEnv, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """Run the expert for one episode; return its frames, actions and last info."""
    obs = env.reset(seed)
    expert = ScriptedExpert(env)
    frames, actions, done, info = [obs["image"]], [], False, {}
    while not done:
        actions.append(expert.act(obs))
        obs, _, done, info = env.step(actions[-1])
        frames.append(obs["image"])
    return frames, actions, info


def test_observation_shapes_and_dtypes():
    env = TabletopEnv(image_size=64)
    obs = env.reset(0)
    assert set(obs) == {"image", "instruction", "proprio", "object"}
    assert obs["object"].shape == (8,) and obs["object"].dtype == np.float32
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["proprio"].shape == (8,) and obs["proprio"].dtype == np.float32
    assert obs["instruction"] == env.instruction and env.task_family in ("pick_place", "next_to")
    assert 3 <= len(env.blocks) <= 4 and len(set(env.colors)) == len(env.colors)
    obs, reward, done, info = env.step(np.zeros(7))
    assert reward == 0.0 and not done and info == {"success": False, "steps": 1}


def test_same_seed_same_episode_and_different_seeds_differ():
    env_a, env_b = TabletopEnv(), TabletopEnv()
    frames_a, actions_a, _ = rollout(env_a, 7)
    frames_b, actions_b, _ = rollout(env_b, 7)
    assert len(frames_a) == len(frames_b)
    assert all(np.array_equal(a, b) for a, b in zip(frames_a, frames_b, strict=True))
    assert np.array_equal(np.stack(actions_a), np.stack(actions_b))
    assert not np.array_equal(env_a.reset(1)["image"], env_b.reset(2)["image"])


@pytest.mark.parametrize("family", ["pick_place", "next_to"])
def test_expert_solves_at_least_95_percent(family):
    env = TabletopEnv(task_family=family)
    outcomes = [rollout(env, seed)[2]["success"] for seed in range(50)]
    assert np.mean(outcomes) >= 0.95, f"{family}: expert solved {sum(outcomes)}/50"
    assert env.instruction.startswith("pick up" if family == "pick_place" else "put the")


def test_next_to_expert_releases_on_the_free_side_nearest_the_target():
    env = TabletopEnv(task_family="next_to", num_blocks=3)
    env.reset(0)
    expert = ScriptedExpert(env)
    env.blocks = np.array([[0.5, 0.05], [0.0, 0.0], [-0.6, -0.6]])  # target right of the anchor, the third block far away
    np.testing.assert_allclose(expert.goal(), [0.2, 0.0])
    env.blocks[2] = [0.25, 0.1]  # now the right side is taken: the nearest free side is above
    np.testing.assert_allclose(expert.goal(), [0.0, 0.2])
    env.blocks[1] = [0.75, 0.0]  # anchor at the edge: the side beyond 0.9 is never chosen
    assert expert.goal()[0] <= 0.9


def test_timeout_ends_the_episode_without_success():
    env = TabletopEnv(max_steps=5)
    env.reset(0)
    results = [env.step(np.zeros(7)) for _ in range(5)]
    assert [done for _, _, done, _ in results] == [False] * 4 + [True]
    _, reward, _, info = results[-1]
    assert not info["success"] and reward == 0.0 and info["steps"] == 5


def test_render_shows_the_gripper_moving_and_closing():
    env = TabletopEnv()
    before = env.reset(0)["image"]
    moved = env.step(np.array([1.0, 0, 0, 0, 0, 0, -1.0]))[0]["image"]
    closed = env.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))[0]["image"]
    lowered = env.step(np.array([0, 0, -1.0, 0, 0, 0, 1.0]))[0]["image"]
    assert (before != moved).any() and (moved != closed).any() and (closed != lowered).any()
    assert np.array_equal(env.render(), lowered)


def test_bad_action_shape_and_bad_config_raise():
    env = TabletopEnv()
    env.reset(0)
    with pytest.raises(ShapeError, match=r"\[7\]"):
        env.step(np.zeros(6))
    with pytest.raises(ConfigError, match="task_family"):
        TabletopEnv(task_family="stack")
    with pytest.raises(ConfigError, match="Did you mean 'tabletop'"):
        make_env("tabeltop")
    with pytest.raises(ConfigError, match="Did you mean 'robosuite:Lift'"):
        make_env("robosuit:Lift")
    assert isinstance(make_env("tabletop", image_size=32), TabletopEnv)


def _grasp_at(env: TabletopEnv, offset: tuple[float, float]) -> TabletopEnv:
    """Put the open gripper low at `offset` from block 0 and close it (two steps)."""
    env.reset(0)
    env.gripper = np.array([*(env.blocks[0] + offset), 0.04])
    for _ in range(2):
        env.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))
    return env


@pytest.mark.parametrize("offset, grasped", [((0.0, 0.0), True), ((0.055, 0.0), True), ((0.0, 0.095), True),
                                             ((0.065, 0.0), False), ((0.0, 0.105), False), ((0.3, 0.3), False)])
def test_parallel_jaws_grasp_only_a_block_between_them(offset, grasped):
    env = _grasp_at(TabletopEnv(), offset)
    assert (env.held == 0) is grasped
    if grasped:  # centred between the jaws in x, the y offset kept, and carried with the gripper
        assert np.allclose(env.held_offset, (0.0, -offset[1]))
        env.step(np.array([1.0, 0, 1.0, 0, 0, 0, 1.0]))
        assert np.allclose(env.blocks[0], env.gripper[:2] + env.held_offset)


def test_no_grasp_high_above_the_table():
    env = TabletopEnv()
    env.reset(0)
    env.gripper = np.array([*env.blocks[0], 0.5])
    for _ in range(2):
        env.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))
    assert env.held is None
