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

COMMANDS = ("bench-latency", "calibrate", "check-expert", "collect-features", "convert", "demo", "eval", "export-draft", "generate-demos",
            "inspect", "inspect-main", "presets", "synthetic-actions", "train-draft", "train-policy", "train-tokenizer")


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


def test_options_of_another_environment_are_refused(tmp_path) -> None:
    out = str(tmp_path / "d.hdf5")
    for extra in (["--workers", "2"], ["--tasks", "0-3"]):
        result = CliRunner().invoke(main, ["generate-demos", "--episodes", "1", "--out", out, *extra])
        assert result.exit_code == 2 and "apply to libero:* environments" in result.output
    result = CliRunner().invoke(main, ["check-expert", "--env", "tabletop"])
    assert result.exit_code == 2 and "expected libero:<suite>" in result.output


def test_libero_demos_go_to_the_resumable_recorder(tmp_path, monkeypatch) -> None:
    import rsd.envs.libero_demos

    calls = []

    def fake(suite, episodes, out, **options):
        calls.append((suite, episodes, out, options))
        return {"episodes": 3, "failed": 1, "steps": 10, "seconds": 1.0, "steps_per_second": 10.0, "out": out, "per_task": {0: [2, 0], 1: [1, 1]}}

    monkeypatch.setattr(rsd.envs.libero_demos, "generate_libero_demos", fake)
    out = str(tmp_path / "d.hdf5")
    result = CliRunner().invoke(main, ["generate-demos", "--env", "libero:libero_spatial", "--tasks", "0-1", "--workers", "2", "--episodes", "2",
                                       "--out", out])
    assert result.exit_code == 0, result.output
    assert calls == [("libero_spatial", 2, out, {"tasks": [0, 1], "seed": 0, "image_size": 64, "workers": 2, "assets": None})]
    assert "per task (kept/failed): 0: 2/0, 1: 1/1" in result.output


def test_int_lists_take_ranges() -> None:
    from rsd.cli import _int_list

    assert _int_list("0,3,5-7") == [0, 3, 5, 6, 7] and _int_list("8, 16,24") == [8, 16, 24] and _int_list(None) is None


def test_option_choices_are_the_librarys() -> None:
    """The choices spelled out in the commands (so `rsd --help` imports no torch) are the ones the library checks."""
    from rsd.config import SELECT_BY
    from rsd.data.convert import TARGETS
    from rsd.data.source import IMAGE_CONVENTIONS, STATISTICS
    from rsd.data.video import VIDEO_SETTINGS

    def choices(command: str, option: str) -> list[str]:
        (param,) = [p for p in main.commands[command].params if p.name == option]
        return list(param.type.choices)

    assert choices("train-policy", "image_convention") == list(IMAGE_CONVENTIONS)
    assert choices("train-policy", "stats") == list(STATISTICS)
    assert choices("train-policy", "select_by") == list(SELECT_BY)
    assert choices("convert", "to") == list(TARGETS) and choices("convert", "video") == sorted(VIDEO_SETTINGS)


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
