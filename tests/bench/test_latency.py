"""bench-latency in random-weight mode on the tiny preset: the report's structure, not its speed."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rsd.bench.latency import run_bench_latency
from rsd.cli import main
from rsd.errors import ConfigError


def test_random_weight_bench_reports_every_stage_and_the_speedup(tmp_path) -> None:
    report = run_bench_latency(preset="tiny", random_weights=True, device="cpu", iters=3, warmup=1, exit_layers=[2, 4],
                               acceptance=0.7, json_path=tmp_path / "bench.json", plot_path=tmp_path / "bench.png")
    stages = {(row["stage"], row["exit_layer"]) for row in report["rows"]}
    for k in (2, 4):
        assert {("llm prefix", k), ("llm suffix", k), ("draft", k), ("speculative, accept path (tau=0)", k)} <= stages
    assert ("baseline predict_chunk (main only)", None) in stages
    for row in report["rows"]:
        assert 0 < row["p50"] <= row["p90"] <= row["p99"] <= row["max"]
    assert set(report["speedup"]) == {2, 4} and all(v["speedup"] > 0 for v in report["speedup"].values())
    curve = report["exit_layers"][2]["curve"]
    assert curve[0]["acceptance"] == 0.0 and curve[-1]["acceptance"] == 1.0
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert json.loads((tmp_path / "bench.json").read_text())["warmup_excluded"] == 1


def test_cli_prints_the_table_and_one_json_line_last() -> None:
    result = CliRunner().invoke(main, ["bench-latency", "--preset", "tiny", "--random-weights", "--device", "cpu", "--iters", "2",
                                       "--warmup", "1", "--exit-layers", "3", "--acceptance", "0.5"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert "| stage |" in result.output
    assert json.loads(lines[-1])["speedup"]["3"] > 0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match="either --bundle"):
        run_bench_latency(device="cpu")
    with pytest.raises(ConfigError, match="--random-weights"):
        run_bench_latency(preset="tiny", device="cpu")
    with pytest.raises(ConfigError, match="acceptance"):
        run_bench_latency(preset="tiny", random_weights=True, device="cpu", acceptance=1.5)
    with pytest.raises(ConfigError, match="--iters: expected an int >= 1"):
        run_bench_latency(preset="tiny", random_weights=True, device="cpu", iters=0)
    with pytest.raises(ConfigError, match="--warmup"):
        run_bench_latency(preset="tiny", random_weights=True, device="cpu", warmup=-1)
