"""`rsd demo --quick` end to end: every step runs and the report's figures are present and sane."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from rsd.cli import main


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    for section in ("Time per step", "Tokenizer", "Drafts by exit layer", "Latency", "Closed-loop sweep"):
        assert section in markdown
    assert len(report["tokenizer"]["val_mse_by_layers"]) == 8
    assert report["compiled_training"] is False and "; eager" in markdown  # --quick trains eagerly: compiling would cost more than it saves
    assert report["bench"]["baseline_p50"] > 0
    assert report["bench"]["replay"]["speedup"] > 0 and 0.0 <= report["bench"]["replay"]["acceptance"] <= 1.0
    for layer in report["bench"]["speedup"].values():
        assert layer["speedup"] > 0
    rows = {row["name"]: row for row in report["sweep"]["rows"]}
    assert list(rows)[:2] == ["main-only", "bundle"] and report["sweep"]["chosen"] in rows
    assert ("chunk alpha=0.3" in rows or len(rows) == 2) and "prefix alpha=0.3" not in rows  # the chunk gate (sweep_modes), unless it equals the bundle's
    for row in rows.values():
        assert row["episodes"] == 4 and 0.0 <= row["success_rate"] <= 1.0 and row["ms_per_step"] > 0
    assert rows["main-only"]["acceptance"] is None and 0.0 <= rows["bundle"]["acceptance"] <= 1.0
    assert rows["bundle"]["gate"] == json.loads((out / "bundle" / "manifest.json").read_text())["gate"]
    for entry in report["drafts"].values():
        assert 0.0 <= entry["draft"]["val_agreement"] <= 1.0
        gate = entry["calibration"]["gate"]
        assert gate["mode"] == "prefix" and (math.isinf(gate["tau"]) or 0.0 <= gate["tau"] <= 1.0)
        assert entry["calibration"]["test_risk"] <= 1.0 and entry["calibration"]["upper_bound"] <= 1.0
    for path in ("bundle/manifest.json", "policy/policy.json", "tokenizer/tokenizer.json", "bench.png", "sweep.png", "sweep.json", "demos.hdf5",
                 "policy_demos/policy.json", "aggregate.hdf5", "draft_demos.hdf5"):
        assert (out / path).is_file(), path
    recovery = report["recovery"]  # DAgger: the first policy started these episodes, the expert finished them
    assert recovery["aggregated"] == min(30, report["demos"]["episodes"])  # the recovery episodes beside the first 30 demonstrations
    assert recovery["episodes"] + recovery["learner_done"] + recovery["failed"] == 10
    families = report["sweep"]["per_task"]
    assert set(families) <= {"pick_place", "next_to"} and sum(f["episodes"] for f in families.values()) == 4
    assert "Main-only success" in markdown and f"the first 30 of the {report['demos']['episodes']} demonstrations" in markdown
    first, second = report["policy_demos"], report["policy"]  # the first policy is kept by validation L1: it only starts DAgger
    assert not [m for m in first["history"] if "rollout_success" in m] and first["options"]["select_by"] == "val_l1"
    assert first["best"]["val_action_l1"] == min(m["val_action_l1"] for m in first["history"])
    assert [m["epoch"] for m in second["history"] if "rollout_success" in m] == [1]
    assert f"{second['steps']:,} steps in" in markdown and f"before DAgger: {first['steps']:,} steps in" in markdown


def test_another_seed_draws_other_layouts(tmp_path, monkeypatch) -> None:
    from rsd.demo import QUICK, run_demo
    from rsd.errors import ConfigError

    seeds = []

    class Stop(Exception):
        """Ends the demo once both demonstration files would have been generated."""

    def generate(env, episodes, out, seed=0, **options):
        seeds.append(seed)
        if len(seeds) == 2:
            raise Stop
        return {}

    monkeypatch.setattr("rsd.envs.demos.generate_demos", generate)
    with pytest.raises(Stop):
        run_demo(tmp_path / "demo", quick=True, seed=2)
    assert seeds == [200_000, 230_000] and not (tmp_path / "demo").exists()  # demonstrations, then the drafts' episodes
    assert CliRunner().invoke(main, ["demo", "--seed", "-1", "--out", str(tmp_path / "demo")]).exit_code == 2
    with pytest.raises(ConfigError, match="--seed"):
        run_demo(tmp_path / "demo", quick=True, seed=-1)
    assert QUICK.aggregate_demos < QUICK.episodes  # the quick run exercises the partial aggregate
