"""Demonstration recording through the environment registry: any env with an expert, the file it writes, refusals,
and DART noise that perturbs what the env executes, never what the episode records."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from rsd.data.hdf5 import read_demos, read_env_spec, read_provenance
from rsd.envs.base import expert_factory, make_env
from rsd.envs.demos import generate_demos, rollout
from rsd.envs.expert import ScriptedExpert
from rsd.envs.tabletop import TabletopEnv
from rsd.errors import ConfigError


def test_tabletop_demos_are_recorded_with_the_options_given(tmp_path) -> None:
    summary = generate_demos("tabletop", episodes=3, out=tmp_path / "d.hdf5", seed=5, image_size=32, progress=False,
                             task_family="pick_place")
    episodes = read_demos(tmp_path / "d.hdf5")
    assert summary["episodes"] == len(episodes) >= 2 and summary["episodes"] + summary["failed"] == 3
    assert all(e.images["agentview"].shape[1:] == (32, 32, 3) and e.instruction.startswith("pick up") for e in episodes)
    with h5py.File(tmp_path / "d.hdf5") as handle:
        env_args = json.loads(handle["data"].attrs["env_args"])
    assert env_args["env_kwargs"] == {"image_size": 32, "task_family": "pick_place"}
    assert read_provenance(tmp_path / "d.hdf5") == [{"first_demo": 0, "end_demo": len(episodes), "seeds": [5, 7], "noise": 0.0,
                                                     "learner": None, "handover": None}]


def test_expert_registry() -> None:
    env = make_env("tabletop")
    assert isinstance(expert_factory("tabletop")(env), ScriptedExpert)
    with pytest.raises(ConfigError, match="expected a LiberoEnv"):
        expert_factory("libero:libero_spatial/0")(env)
    with pytest.raises(ConfigError, match="Did you mean 'tabletop'"):
        expert_factory("tabeltop")


def test_bad_requests_are_refused_before_anything_runs(tmp_path) -> None:
    with pytest.raises(ConfigError, match="episodes"):
        generate_demos("tabletop", episodes=0, out=tmp_path / "d.hdf5")
    with pytest.raises(ConfigError, match="Did you mean 'tabletop'"):
        generate_demos("tabeltop", episodes=1, out=tmp_path / "d.hdf5")
    assert not (tmp_path / "d.hdf5").exists()


class RecordingEnv(TabletopEnv):
    """The tabletop world that remembers every action it executed."""

    def reset(self, seed: int) -> dict:
        self.executed: list[np.ndarray] = []
        return super().reset(seed)

    def step(self, action: np.ndarray):
        self.executed.append(np.array(action))
        return super().step(action)


class RecordingExpert(ScriptedExpert):
    """The scripted expert that remembers every action it returned."""

    def reset(self, seed: int | None = None) -> None:
        self.returned: list[np.ndarray] = []
        super().reset(seed)

    def act(self, obs=None) -> np.ndarray:
        self.returned.append(super().act(obs))
        return self.returned[-1]


def test_dart_noise_records_the_clean_expert_action():
    env = RecordingEnv()
    expert = RecordingExpert(env)
    episode, _ = rollout(env, expert, seed=3, episode_id=0, cameras=("agentview",), noise=0.2)
    clean, executed = np.stack(expert.returned), np.stack(env.executed)
    assert np.array_equal(episode.actions, clean)
    assert not np.allclose(executed[:, :3], clean[:, :3])  # xyz perturbed
    assert np.array_equal(executed[:, 3:], clean[:, 3:])  # rotation and gripper untouched
    assert (np.abs(executed) <= 1.0).all()
    again = RecordingEnv()
    episode_again, _ = rollout(again, RecordingExpert(again), seed=3, episode_id=0, cameras=("agentview",), noise=0.2)
    assert np.array_equal(episode_again.actions, episode.actions)  # the noise is seeded per episode


def test_noise_free_rollout_executes_what_it_records():
    env = RecordingEnv()
    episode, success = rollout(env, RecordingExpert(env), seed=5, episode_id=0, cameras=("agentview",))
    assert success and np.array_equal(np.stack(env.executed), episode.actions)


def test_generated_file_records_its_environment(tmp_path):
    path = tmp_path / "demos.hdf5"
    summary = generate_demos("tabletop", episodes=3, out=path, noise=0.1, progress=False)
    assert summary["episodes"] == 3 and summary["noise"] == 0.1 and len(read_demos(path)) == 3
    assert read_env_spec(path) == ("tabletop", {"image_size": 64})


def test_the_recorded_object_state_is_the_worlds_at_each_frame():
    env = TabletopEnv()
    for seed in (0, 1, 2, 3):  # both task families
        episode, success = rollout(env, ScriptedExpert(env), seed=seed, episode_id=0, cameras=("agentview",), noise=0.1)
        state, gripper = episode.object_state, episode.proprio[:, :2]
        assert success and state.shape == (len(episode), 8) and state.dtype == np.float32
        np.testing.assert_allclose(state[:, 4:6], state[:, 0:2] - gripper, atol=1e-6)  # target relative to the gripper
        np.testing.assert_allclose(state[:, 6:8], state[:, 2:4] - gripper, atol=1e-6)  # goal relative to the gripper
        env.reset(seed)
        goal = env.plate if env.anchor is None else env.blocks[env.anchor]
        np.testing.assert_allclose(state[0, :4], [*env.blocks[env.target], *goal], atol=1e-6)
        assert np.allclose(state[:, 2:4], goal)  # the goal never moves; the target moves only while carried
        assert not np.allclose(state[:, 0:2], state[0, 0:2])


class ScriptedLearner:
    """A learner that drives right and closes the gripper on nothing: a missed grasp the expert must recover from."""

    def __init__(self) -> None:
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def act(self, obs: dict) -> np.ndarray:
        return np.array([1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0], dtype=np.float32)


def test_handover_records_the_expert_from_the_state_the_learner_left():
    env, learner = RecordingEnv(), ScriptedLearner()
    expert = RecordingExpert(env)
    episode, success = rollout(env, expert, seed=5, episode_id=0, cameras=("agentview",), learner=learner, handover=6)
    executed = np.stack(env.executed)
    assert learner.resets == 1 and (executed[:6] == learner.act({})).all()  # the learner's steps are executed, not recorded
    assert np.array_equal(episode.actions, np.stack(expert.returned)) and len(episode) == len(executed) - 6
    replay = TabletopEnv()
    replay.reset(5)
    for _ in range(6):
        obs, *_ = replay.step(learner.act({}))
    assert np.array_equal(episode.images["agentview"][0], obs["image"]) and np.array_equal(episode.proprio[0], obs["proprio"])
    assert np.array_equal(episode.object_state[0], obs["object"])  # the object state of the frame it stands beside
    assert replay.opening == 0.0 and replay.held is None  # the expert starts from a gripper closed on nothing ...
    assert success and episode.actions[0, 6] == -1.0  # ... reopens it and still solves the task


def test_handover_after_the_learner_ended_the_episode_records_nothing():
    env = TabletopEnv(max_steps=4)
    episode, success = rollout(env, ScriptedExpert(env), seed=5, episode_id=0, cameras=("agentview",), learner=ScriptedLearner(), handover=10)
    assert episode is None and not success


def test_aggregate_needs_the_same_environment(tmp_path):
    generate_demos("tabletop", episodes=2, out=tmp_path / "a.hdf5", image_size=32, progress=False)
    with pytest.raises(ConfigError, match="--aggregate"):
        generate_demos("tabletop", episodes=1, out=tmp_path / "b.hdf5", image_size=64, aggregate=tmp_path / "a.hdf5", progress=False)
    with pytest.raises(ConfigError, match="--handover"):
        generate_demos("tabletop", episodes=1, out=tmp_path / "b.hdf5", policy=tmp_path, handover=0, progress=False)
    with pytest.raises(ConfigError, match="--replan-every"):
        generate_demos("tabletop", episodes=1, out=tmp_path / "b.hdf5", replan_every=4, progress=False)
    assert not (tmp_path / "b.hdf5").exists()


def test_aggregate_accepts_the_options_it_was_recorded_with_after_the_json_round_trip(tmp_path):
    from rsd.data.dataset import Episode
    from rsd.data.hdf5 import write_demos
    from rsd.envs.demos import _aggregated

    episode = Episode(0, "lift the red cube", np.zeros((3, 7), np.float32), {"agentview": np.zeros((3, 8, 8, 3), np.uint8)}, np.zeros((3, 8), np.float32))
    write_demos(tmp_path / "a.hdf5", [episode], "robosuite:Lift", {"image_size": 8, "cameras": ("agentview",)})
    earlier, _ = _aggregated(tmp_path / "a.hdf5", "robosuite:Lift", {"cameras": ("agentview",), "image_size": 8})  # a tuple, as the env takes it
    assert [e.episode_id for e in earlier] == [0]
    with pytest.raises(ConfigError, match="robot0_eye_in_hand"):
        _aggregated(tmp_path / "a.hdf5", "robosuite:Lift", {"cameras": ("agentview", "robot0_eye_in_hand"), "image_size": 8})


def test_aggregate_episodes_keeps_the_first_ones_and_says_so(tmp_path):
    from rsd.data.hdf5 import read_demos, read_provenance

    generate_demos("tabletop", episodes=3, out=tmp_path / "a.hdf5", image_size=32, progress=False)
    summary = generate_demos("tabletop", episodes=1, out=tmp_path / "b.hdf5", seed=9, image_size=32, aggregate=tmp_path / "a.hdf5",
                             aggregate_episodes=2, progress=False)
    before, after = read_demos(tmp_path / "a.hdf5"), read_demos(tmp_path / "b.hdf5")
    assert summary["aggregated"] == 2 and len(after) == 3
    assert all(np.array_equal(a.actions, b.actions) for a, b in zip(before[:2], after[:2], strict=True))
    assert not np.array_equal(after[2].actions[:5], before[2].actions[:5])  # seed 9's episode, not the third of a.hdf5
    assert read_provenance(tmp_path / "b.hdf5")[1] == {"kept_first": 2, "of": 3, "from": str(tmp_path / "a.hdf5")}
    with pytest.raises(ConfigError, match="--aggregate-episodes"):
        generate_demos("tabletop", episodes=1, out=tmp_path / "c.hdf5", image_size=32, aggregate_episodes=2, progress=False)


def test_recovery_episodes_side_by_side_are_the_episodes_recorded_alone(tmp_path, tiny_main):
    """`generate_demos(policy=..., batch=3)`: the same file as one episode at a time (a policy of random weights: its
    states are odd, the expert recovers from most)."""
    tiny_main.save(tmp_path / "policy")
    options = {"episodes": 5, "seed": 40, "noise": 0.1, "policy": tmp_path / "policy", "handover": 12, "replan_every": 4, "progress": False}
    alone = generate_demos("tabletop", out=tmp_path / "alone.hdf5", **options)
    together = generate_demos("tabletop", out=tmp_path / "together.hdf5", batch=3, **options)
    assert {k: alone[k] for k in ("episodes", "failed", "steps", "learner_done")} == {k: together[k] for k in ("episodes", "failed", "steps", "learner_done")}
    a, b = read_demos(tmp_path / "alone.hdf5"), read_demos(tmp_path / "together.hdf5")
    assert [e.episode_id for e in b] == list(range(alone["episodes"])) and alone["episodes"] > 0
    for x, y in zip(a, b, strict=True):
        assert x.instruction == y.instruction and np.array_equal(x.actions, y.actions)
        assert np.array_equal(x.images["agentview"], y.images["agentview"]) and np.array_equal(x.object_state, y.object_state)
    assert read_provenance(tmp_path / "alone.hdf5") == read_provenance(tmp_path / "together.hdf5")
    with pytest.raises(ConfigError, match="--batch"):
        generate_demos("tabletop", episodes=2, out=tmp_path / "c.hdf5", batch=2, progress=False)
    from rsd.envs.demos import record_demos

    world = TabletopEnv()
    with pytest.raises(ConfigError, match="one of each with one env"):
        record_demos(world, [ScriptedExpert(world)], [0], tmp_path / "d.hdf5", "tabletop", {}, ("agentview",), progress=False)
    with pytest.raises(ConfigError, match="expected learners too"):
        record_demos([world], [ScriptedExpert(world)], [0], tmp_path / "d.hdf5", "tabletop", {}, ("agentview",), progress=False)
