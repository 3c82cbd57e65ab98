"""Demonstration recording: DART noise perturbs what the env executes, never what the episode records."""

from __future__ import annotations

import numpy as np

from rsd.data.demos import generate_demos, rollout
from rsd.data.hdf5 import read_demos, read_env_spec
from rsd.envs.expert import ScriptedExpert
from rsd.envs.tabletop import TabletopEnv


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
    assert read_env_spec(path) == ("tabletop", {"image_size": 64, "task_family": "any"})
