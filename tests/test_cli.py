"""The `rsd` command line: every command is registered, rsd's errors become one clear line, and it runs spread over ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_main

from rsd.cli import main

COMMANDS = ("bench-latency", "calibrate", "collect-features", "demo", "eval", "export-draft", "generate-demos", "inspect",
            "inspect-main", "presets", "synthetic-actions", "train-draft", "train-policy", "train-tokenizer")


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output
    for command in COMMANDS:
        assert CliRunner().invoke(main, [command, "--help"]).exit_code == 0, command


def test_rsd_errors_become_one_clear_line() -> None:
    result = CliRunner().invoke(main, ["presets", "tiyn"])
    assert result.exit_code == 1 and "ConfigError" in result.output and "Did you mean 'tiny'" in result.output


@pytest.mark.distributed
def test_eval_with_two_workers_plays_every_seed_as_one_process(tmp_path) -> None:
    make_tiny_main(seed=5).save(tmp_path / "policy")
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}.json"
        result = CliRunner().invoke(main, ["eval", "--policy", str(tmp_path / "policy"), "--episodes", "5", "--seed", "300", "--device", "cpu",
                                           "--workers", str(workers), "--json", str(out)])
        assert result.exit_code == 0, result.output
        runs[workers] = json.loads(out.read_text())["baseline"]
    assert [e["seed"] for e in runs[2]["episodes"]] == list(range(300, 305))
    assert runs[2]["episodes"] == runs[1]["episodes"] and runs[2]["chunks"] == runs[1]["chunks"] > 0
    assert runs[1]["latency_ms"] is not None and runs[2]["latency_ms"] is None


@pytest.mark.distributed
@pytest.mark.slow
def test_collect_features_runs_unchanged_under_torchrun(tmp_path) -> None:
    from rsd.envs.demos import generate_demos
    from rsd.training.features import collect_features, load_features

    make_tiny_main(seed=3).save(tmp_path / "policy")
    generate_demos("tabletop", episodes=3, out=tmp_path / "demos.hdf5", seed=0, progress=False)
    collect_features(tmp_path / "policy", tmp_path / "demos.hdf5", 2, tmp_path / "single", shard_size=32, progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rsd.cli", "collect-features",
               "--policy", str(tmp_path / "policy"), "--data", str(tmp_path / "demos.hdf5"), "--exit-layer", "2", "--shard-size", "32",
               "--out", str(tmp_path / "torchrun")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and printed[0]["world_size"] == 2  # only rank 0 reports
    single, ranks = load_features(tmp_path / "single"), load_features(tmp_path / "torchrun")
    assert torch.equal(single.exit_hidden, ranks.exit_hidden) and torch.equal(single.main_logits, ranks.main_logits)
    assert {e["rank"] for e in ranks.index["shards"]} == {0, 1}
