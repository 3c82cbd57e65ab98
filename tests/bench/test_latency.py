"""bench-latency in random-weight mode on the tiny preset: the report's structure, not its speed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rsd.bench.latency import run_bench_latency, stage_sum
from rsd.bench.timing import NOISY_SPREAD, interleaved, noise_warning, ratio_ci, spread, time_calls
from rsd.cli import main
from rsd.errors import ConfigError
from rsd.runtime.timing import summarize


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


class FakeClock:
    """Seconds that advance only when a fake stage runs: every timing is exact and repeatable."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def stage(self, *ms: float):
        """A stage that costs `ms[i % len(ms)]` milliseconds on its i-th call."""
        calls = iter(range(10**9))

        def run() -> None:
            self.now += ms[next(calls) % len(ms)] / 1e3

        return run


def test_stage_sum_and_interleaved_ratio_agree_on_a_fake_clock() -> None:
    clock, cpu, p = FakeClock(), torch.device("cpu"), 0.7
    cost = {"vision": 2.0, "prefix": 3.0, "suffix": 3.5, "draft": 0.5, "head": 0.25, "decoder c=3": 0.125, "decoder c=8": 0.125}
    stage = {name: clock.stage(ms) for name, ms in cost.items()}

    def chain(*names: str):
        return lambda: [stage[name]() for name in names]

    timed = {name: summarize(time_calls(fn, 5, 1, cpu, clock))["p50"] for name, fn in stage.items()}
    runs = interleaved({"baseline": chain("vision", "prefix", "suffix", "head", "decoder c=8"),
                        "accept": chain("vision", "prefix", "draft", "decoder c=3"),
                        "reject": chain("vision", "prefix", "draft", "suffix", "head", "decoder c=8")}, 20, 2, cpu, clock)
    ratio = ratio_ci(p * np.asarray(runs["accept"]) + (1 - p) * np.asarray(runs["reject"]), runs["baseline"])
    speculative = stage_sum(timed["vision"], timed["prefix"], timed["draft"], p * timed["decoder c=3"],
                            (1 - p) * (timed["suffix"] + timed["head"] + timed["decoder c=8"]))
    baseline = stage_sum(timed["vision"], timed["prefix"] + timed["suffix"], timed["head"], timed["decoder c=8"])
    assert ratio["ratio"] == pytest.approx(speculative / baseline, rel=1e-9)
    assert ratio["low"] == pytest.approx(ratio["ratio"]) and ratio["high"] == pytest.approx(ratio["ratio"])
    assert ratio["ratio"] == pytest.approx((0.7 * 5.625 + 0.3 * 9.375) / 8.875, rel=1e-9)
    assert noise_warning(runs) is None and spread(runs["baseline"]) == pytest.approx(1.0)


def test_a_noisy_machine_is_reported() -> None:
    clock, cpu = FakeClock(), torch.device("cpu")
    runs = interleaved({"steady": clock.stage(1.0), "bursty": clock.stage(1.0, 1.0, 1.0, 1.0, 4.0)}, 50, 0, cpu, clock)
    assert spread(runs["bursty"]) > NOISY_SPREAD
    assert "too noisy" in noise_warning(runs) and "'bursty'" in noise_warning(runs)
    ratio = ratio_ci(runs["bursty"], runs["steady"])
    assert ratio["low"] <= ratio["ratio"] <= ratio["high"]


@pytest.mark.slow
def test_cli_compile_prints_eager_against_compiled_for_every_stage_and_both_policies() -> None:
    result = CliRunner().invoke(main, ["bench-latency", "--preset", "tiny", "--random-weights", "--device", "cpu", "--iters", "3",
                                       "--warmup", "1", "--exit-layers", "3", "--acceptance", "0.7", "--compile", "inductor"])
    assert result.exit_code == 0, result.output
    assert "Eager vs compiled (inductor)" in result.output
    for stage in ("vision+embed", "llm prefix", "llm suffix", "rfsq head", "draft", "decoder c=3", "decoder c=8"):
        assert f"| {stage} |" in result.output.split("Eager vs compiled")[1]
    summary = json.loads(result.output.strip().splitlines()[-1])["compile"]
    assert summary["mode"] == "inductor" and summary["recompiles"] == 0
    assert {"baseline", "accept 3", "reject 3"} <= set(summary) and summary["baseline"] > 0
