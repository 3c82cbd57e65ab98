"""Closed-loop evaluation with a scripted policy: success, videos and the report's JSON and markdown."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rsd.envs.evaluate import evaluate, format_rate, wilson_interval
from rsd.envs.expert import ScriptedExpert
from rsd.envs.tabletop import TabletopEnv
from rsd.errors import ConfigError


class ExpertPolicy:
    """The scripted expert behind the policy interface (reset / act / stats), with fake chunk counters."""

    def __init__(self, env: TabletopEnv) -> None:
        self.expert = ScriptedExpert(env)
        self.calls = 0

    def reset(self) -> None:
        self.expert.reset()

    def act(self, obs: dict) -> np.ndarray:
        self.calls += 1
        return self.expert.act(obs)

    def stats(self) -> dict:
        accepted = sum(1 for i in range(self.calls) if i % 4)  # 3 of every 4 "chunks" accepted
        return {"calls": self.calls, "acceptance_rate": accepted / self.calls if self.calls else math.nan, "agreement": None,
                "stages": {"total": {"n": self.calls, "p50": 2.0, "mean": 2.5}} if self.calls else {}}


def test_evaluate_scripted_policy_succeeds_and_reports(tmp_path):
    env = TabletopEnv()
    report = evaluate(ExpertPolicy(env), env, seeds=[100, 101, 102, 103, 104], video_dir=tmp_path, progress=False)
    assert report.success_rate >= 0.9
    assert [e.seed for e in report.episodes] == [100, 101, 102, 103, 104]
    assert all(0 < e.length <= env.max_steps for e in report.episodes)
    videos = sorted(tmp_path.glob("*.gif"))
    assert len(videos) == 5 and videos[0].read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    data = json.loads(json.dumps(report.to_json()))
    assert {"success_rate", "wilson_95", "mean_length", "acceptance_rate", "latency_ms", "per_task", "episodes"} <= set(data)
    assert data["wilson_95"][0] <= data["success_rate"] <= data["wilson_95"][1]
    assert 0.0 <= data["success_rate"] <= 1.0 and data["mean_length"] > 0
    assert 0.7 <= data["acceptance_rate"] <= 0.8 and data["latency_ms"] == {"p50": 2.0, "mean": 2.5}
    assert sum(row["episodes"] for row in data["per_task"].values()) == 5
    assert set(data["per_task"]) <= {"pick_place", "next_to"}
    markdown = report.to_markdown()
    assert markdown.startswith("| task |") and "ExpertPolicy" in markdown and "acceptance" in markdown


def test_acceptance_covers_only_this_call_and_main_only_has_none():
    env = TabletopEnv()
    policy = ExpertPolicy(env)
    evaluate(policy, env, seeds=[0], progress=False)
    calls_before = policy.calls
    second = evaluate(policy, env, seeds=[1], progress=False)

    def accepted(calls: int) -> int:
        return calls - math.ceil(calls / 4)

    expected = (accepted(policy.calls) - accepted(calls_before)) / (policy.calls - calls_before)
    assert second.acceptance_rate == pytest.approx(expected)
    MainOnlyPolicy = type("MainOnlyPolicy", (ExpertPolicy,), {})
    assert evaluate(MainOnlyPolicy(env), env, seeds=[0], progress=False).acceptance_rate is None


def test_bad_arguments_raise(tmp_path):
    env = TabletopEnv()
    with pytest.raises(ConfigError, match="seed"):
        evaluate(ExpertPolicy(env), env, seeds=[], progress=False)
    with pytest.raises(ConfigError, match="gif"):
        evaluate(ExpertPolicy(env), env, seeds=[0], video_dir=tmp_path, video_format="avi", progress=False)


def test_wilson_interval_matches_known_values_and_covers_the_edges():
    low, high = wilson_interval(28, 50)  # textbook value for 28/50: 0.423 .. 0.688
    assert low == pytest.approx(0.4233, abs=1e-3) and high == pytest.approx(0.6878, abs=1e-3)
    assert wilson_interval(0, 50)[0] == pytest.approx(0.0) and 0.0 < wilson_interval(0, 50)[1] < 0.08
    assert wilson_interval(50, 50)[1] == pytest.approx(1.0) and 0.92 < wilson_interval(50, 50)[0] < 1.0
    assert "28/50 (56.0 %, 95 % CI 42.3–68.8 %)" == format_rate(28, 50)
    with pytest.raises(ConfigError, match="successes"):
        wilson_interval(3, 2)


@pytest.mark.slow
def test_parallel_evaluation_matches_the_sequential_one(tmp_path):
    """`rsd eval --workers 2`: the same episodes as one process, merged in seed order; no latency."""
    from conftest import make_tiny_main

    from rsd.envs.evaluate import PolicySpec, compare_policies, evaluate_parallel

    make_tiny_main().save(tmp_path / "policy")
    seeds = list(range(5))
    env_kwargs = {"image_size": 64, "max_steps": 24}  # short episodes: the merge is under test, not the policy
    sequential = compare_policies(tmp_path / "policy", "tabletop", seeds, env_kwargs=env_kwargs, device="cpu")["baseline"]
    parallel = evaluate_parallel(tmp_path / "policy", PolicySpec(), "tabletop", seeds, workers=2, env_kwargs=env_kwargs, device="cpu",
                                 progress=False, seeds_per_job=2)
    assert [e.seed for e in parallel.episodes] == seeds
    assert parallel.episodes == sequential.episodes  # same outcomes and lengths, episode by episode
    assert parallel.acceptance_rate is None and parallel.latency_ms is None and parallel.policy == "MainOnlyPolicy"
    with pytest.raises(ConfigError, match="expected its folder"):
        compare_policies(make_tiny_main(), "tabletop", seeds, workers=2)


def test_merged_shares_equal_one_run_per_seed_with_acceptance_weighted_by_chunks():
    from rsd.envs.evaluate import merge_reports

    env = TabletopEnv()
    seeds = [200, 201, 202, 203, 204]
    whole = evaluate(ExpertPolicy(env), env, seeds=seeds, progress=False)
    parts = [evaluate(ExpertPolicy(env), env, seeds=share, progress=False) for share in (seeds[1::2], seeds[0::2])]
    merged = merge_reports(parts)
    assert merged.episodes == whole.episodes  # seed order, the same outcome per seed
    assert merged.chunks == whole.chunks == sum(e.length for e in whole.episodes)
    accepted = sum(round(p.acceptance_rate * p.chunks) for p in parts)
    assert merged.acceptance_rate == pytest.approx(accepted / merged.chunks)
    assert merged.latency_ms is None and parts[0].latency_ms is not None  # p50 of processes sharing a machine does not combine
    assert merge_reports(parts[:1]) is parts[0]
    with pytest.raises(ConfigError, match="disjoint"):
        merge_reports([parts[0], parts[0]])



class LoggingEnv(TabletopEnv):
    """The tabletop world with a per-seed time limit (so episodes side by side end at different steps), logging every
    executed action under its seed."""

    def __init__(self, log: dict) -> None:
        super().__init__(max_steps=30)
        self.log = log

    def reset(self, seed: int | None = None) -> dict:
        self.max_steps, self.seed_now = 5 + 3 * (seed % 4), seed
        self.log[seed] = []
        return super().reset(seed)

    def step(self, action: np.ndarray):
        self.log[self.seed_now].append(np.array(action))
        return super().step(action)


def test_episodes_side_by_side_are_the_episodes_alone(tiny_main):
    """`play_batch` and `evaluate(batch=N)`: every seed executes the actions it executes alone (slots refilled as
    episodes of different lengths end), results in the order of the seeds, chunks counted, no latency."""
    from rsd.envs.evaluate import play_batch, play_episode
    from rsd.runtime.policy import MainOnlyPolicy

    seeds = [3, 8, 1, 6, 4, 7, 2]
    alone_log, together_log = {}, {}
    world = LoggingEnv(alone_log)
    alone = [play_episode(MainOnlyPolicy(tiny_main, 3), world, seed) for seed in seeds]
    first = MainOnlyPolicy(tiny_main, 3)
    together = play_batch([first, first.replica(), first.replica()], [LoggingEnv(together_log) for _ in range(3)], seeds)
    assert together == alone and len({e.length for e in together}) == 4
    for seed in seeds:
        np.testing.assert_allclose(np.stack(together_log[seed]), np.stack(alone_log[seed]), atol=1e-6)
    env_kwargs = {"image_size": 64, "max_steps": 7}
    one = evaluate(MainOnlyPolicy(tiny_main, 3), "tabletop", seeds, progress=False, env_kwargs=env_kwargs)
    batched = evaluate(MainOnlyPolicy(tiny_main, 3), "tabletop", seeds, progress=False, env_kwargs=env_kwargs, batch=4)
    assert batched.episodes == one.episodes and batched.chunks == one.chunks == 7 * 3
    assert batched.latency_ms is None and one.latency_ms is not None and batched.acceptance_rate is None


def test_batched_evaluation_refuses_what_it_cannot_do(tiny_main, tmp_path):
    from rsd.runtime.policy import MainOnlyPolicy

    policy = MainOnlyPolicy(tiny_main)
    with pytest.raises(ConfigError, match="env's name"):
        evaluate(policy, TabletopEnv(), [0, 1], progress=False, batch=2)
    with pytest.raises(ConfigError, match="videos"):
        evaluate(policy, "tabletop", [0, 1], progress=False, batch=2, video_dir=tmp_path)
    with pytest.raises(ConfigError, match="replica"):
        evaluate(ExpertPolicy(TabletopEnv()), "tabletop", [0, 1], progress=False, batch=2)
    with pytest.raises(ConfigError, match="batch"):
        evaluate(policy, "tabletop", [0, 1], progress=False, batch=0)
