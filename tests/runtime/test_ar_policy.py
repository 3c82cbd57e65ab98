"""The AR action policy: speculative actions equal plain ones, closed loop included; relaxed acceptance is lossy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from decoding_fixtures import scrambled_action_draft, tiny_ar_model

from rsd.envs.evaluate import evaluate
from rsd.envs.tabletop import TabletopEnv
from rsd.errors import ConfigError
from rsd.runtime.ar_policy import ARActionPolicy
from rsd.runtime.decoding import SamplingConfig


def observation(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8),
            "instruction": ["pick up the red block and place it on the plate", "put the red block next to the blue block"][seed % 2]}


class Recorder:
    """A policy wrapper that keeps every action it returns."""

    def __init__(self, policy: ARActionPolicy) -> None:
        self.policy = policy
        self.actions: list[np.ndarray] = []

    def reset(self) -> None:
        self.policy.reset()

    def act(self, obs: dict) -> np.ndarray:
        self.actions.append(self.policy.act(obs))
        return self.actions[-1]

    def stats(self) -> dict:
        return self.policy.stats()


@pytest.mark.parametrize("gamma", [2, 6])
def test_speculative_actions_equal_plain_actions(gamma: int) -> None:
    model = tiny_ar_model()
    plain, speculative = ARActionPolicy(model), ARActionPolicy(model, scrambled_action_draft(model), gamma=gamma)
    for seed in range(4):
        tokens = plain.predict_tokens(observation(seed))
        assert tokens.shape == (7,)
        np.testing.assert_array_equal(speculative.predict_tokens(observation(seed)), tokens)
    stats = speculative.stats()
    assert stats["calls"] == 4 and 0.0 < stats["acceptance_rate"] < 1.0
    assert stats["decoding"]["target_passes"] < plain.stats()["decoding"]["target_passes"] == 4 * 7
    assert set(stats["stages"]) == {"prefix", "decode", "total"}
    assert plain.stats()["acceptance_rate"] is None


def test_closed_loop_outcomes_and_actions_are_identical() -> None:
    model = tiny_ar_model(dtype=torch.float32)
    seeds = [3, 4]
    runs = {}
    for name, policy in (("plain", ARActionPolicy(model)), ("speculative", ARActionPolicy(model, scrambled_action_draft(model), gamma=3))):
        recorder = Recorder(policy)
        report = evaluate(recorder, TabletopEnv(max_steps=6), seeds, progress=False)
        runs[name] = ([(e.success, e.length) for e in report.episodes], np.stack(recorder.actions))
    assert runs["plain"][0] == runs["speculative"][0]
    np.testing.assert_array_equal(runs["plain"][1], runs["speculative"][1])
    assert runs["plain"][1].shape == (12, 7)


def test_relaxed_acceptance_accepts_more_and_stays_near_the_bins() -> None:
    model = tiny_ar_model()
    strict = ARActionPolicy(model, scrambled_action_draft(model), gamma=3)
    relaxed = ARActionPolicy(model, scrambled_action_draft(model), gamma=3, sampling=SamplingConfig(relaxed_distance=40))
    for seed in range(4):
        strict.predict_tokens(observation(seed))
        relaxed.predict_tokens(observation(seed))
    assert relaxed.stats()["acceptance_rate"] > strict.stats()["acceptance_rate"]


def test_draft_of_another_model_is_refused() -> None:
    model = tiny_ar_model()
    with pytest.raises(ConfigError):
        ARActionPolicy(model, scrambled_action_draft(tiny_ar_model(seed=1)))
