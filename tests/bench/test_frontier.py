"""rsd sweep: the Wilson interval, the operating-point rule, and a 2-seed tabletop sweep with the old tiny bundle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import make_tiny_main

from rsd.bench import frontier
from rsd.bench.frontier import BASELINE, GateSetting, _pick, gate_settings, parse_rule, run_sweep_command
from rsd.envs.evaluate import wilson_interval
from rsd.errors import ConfigError
from rsd.runtime.gate import Gate

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "old_bundle"


def test_wilson_interval_matches_known_values():  # the one helper, rsd.envs.evaluate.wilson_interval
    assert wilson_interval(41, 50) == pytest.approx((0.69204, 0.90230), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.72246, 1.0), abs=1e-4)


def test_rule_parsing_and_the_operating_point():
    assert parse_rule("within:5") == 5.0 and parse_rule("fastest") is None
    for bad in ("within", "within:-1", "best", "within:five"):
        with pytest.raises(ConfigError, match="within:P"):
            parse_rule(bad)
    rows = [{"name": BASELINE, "success_rate": 0.80, "ms_per_step": 10.0},
            {"name": "a", "success_rate": 0.70, "ms_per_step": 5.0},
            {"name": "b", "success_rate": 0.76, "ms_per_step": 7.0},
            {"name": "c", "success_rate": 0.82, "ms_per_step": 9.0}]
    assert _pick(rows, 5.0) == "b" and _pick(rows, 10.0) == "a" and _pick(rows, 0.0) == "c" and _pick(rows, None) == "a"
    assert _pick([rows[0], {**rows[1], "success_rate": 0.5}], 5.0) == BASELINE


def test_gate_settings_drop_duplicates_and_calibrating_needs_the_draft():
    bundle = Gate(tau=0.5, mode="prefix", statistic="step", min_steps=2)
    settings = gate_settings(bundle, taus=[0.5, 0.7])
    assert [s.name for s in settings] == ["bundle", "prefix tau=0.7"]
    assert settings[1].gate == Gate(tau=0.7, mode="prefix", statistic="step", min_steps=2)
    with pytest.raises(ConfigError, match="--draft and --features"):
        gate_settings(bundle, modes=["chunk"], alphas=[0.1])


def test_sweep_runs_every_policy_on_the_same_seeds_interleaved(tmp_path, monkeypatch):
    main = make_tiny_main(hidden_size=128)  # the width the old bundle fixture's draft reads
    main.fingerprint = "old-bundle-fixture"
    order = []
    evaluate = frontier.evaluate

    def recording(policy, world, seeds, **kwargs):
        order.append(seeds[0])
        return evaluate(policy, world, seeds, **kwargs)

    monkeypatch.setattr(frontier, "evaluate", recording)
    prefix = GateSetting("prefix tau=0", Gate(tau=0.0, mode="prefix", statistic="step", min_steps=3), {"kind": "test"})
    monkeypatch.setattr(frontier, "gate_settings", lambda *args: [*gate_settings(*args), prefix])
    report = run_sweep_command(main, FIXTURE, "tabletop", episodes=2, seed=500, taus=[0.0], rule="fastest", warmup=1,
                               json_path=tmp_path / "sweep.json", plot_path=tmp_path / "sweep.png", progress=False)
    names = [row["name"] for row in report["rows"]]
    assert names == [BASELINE, "bundle", "chunk tau=0", "prefix tau=0"]
    assert order == [500] * 4 + [501] * 4  # seed by seed, every policy
    rows = {row["name"]: row for row in report["rows"]}
    assert rows[BASELINE]["acceptance"] is None and rows[BASELINE]["time_ratio"] == 1.0
    assert rows["bundle"]["acceptance"] == 0.0 and rows["bundle"]["mean_accepted_steps"] is None  # tau = inf
    assert rows["chunk tau=0"]["acceptance"] == 1.0 and rows["chunk tau=0"]["mean_accepted_steps"] == 8.0
    for row in report["rows"]:
        low, high = row["success_ci95"]
        assert row["episodes"] == 2 and low <= row["success_rate"] <= high and row["ms_per_step"] > 0
        assert row["steps"] == sum(e["length"] for e in report["eval"][row["name"]]["episodes"])
        assert [e["seed"] for e in report["eval"][row["name"]]["episodes"]] == [500, 501]
    assert report["chosen"] == min(report["rows"][1:], key=lambda r: r["ms_per_step"])["name"]
    table = report["markdown"]
    assert table.count("\n| ") == 1 + len(names) and f"{report['chosen']} **(chosen)**" in table
    assert "prefix, step >= 0.0000, at least 3 steps" in table and "/2 (" in table and "whole chunks executed" in table
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["seeds"] == [500, 501] and math.isinf(saved["rows"][1]["gate"]["tau"])
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_sweep_replans_every_policy_alike(monkeypatch):
    main = make_tiny_main(hidden_size=128)  # the width the old bundle fixture's draft reads
    main.fingerprint = "old-bundle-fixture"
    horizons = set()
    evaluate = frontier.evaluate

    def recording(policy, world, seeds, **kwargs):
        horizons.add(policy.policy.replan_every)
        return evaluate(policy, world, seeds, **kwargs)

    monkeypatch.setattr(frontier, "evaluate", recording)
    capped = GateSetting("capped", Gate(tau=0.0, mode="prefix", statistic="step", min_steps=3, max_steps=3), {"kind": "test"})
    monkeypatch.setattr(frontier, "gate_settings", lambda *args: [*gate_settings(*args), capped])
    report = run_sweep_command(main, FIXTURE, "tabletop", episodes=1, seed=500, warmup=1, progress=False, replan_every=3)
    assert horizons == {3} and report["replan_every"] == 3
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["capped"]["acceptance"] == 1.0 and rows["capped"]["mean_accepted_steps"] == 3.0
    assert "the first 3 steps of each chunk executed" in report["markdown"] and "prefix, step >= 0.0000, 3 steps" in report["markdown"]
