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

from rsd.cli import EXIT_BUG, main
from rsd.presets import get_preset

COMMANDS = ("bench-ar", "bench-latency", "bench-text", "calibrate", "check-expert", "collect-features", "convert", "demo", "eval",
            "export-draft", "export-segments", "generate-demos", "inspect", "inspect-main", "presets", "sweep", "synthetic-actions", "train-ar-policy",
            "train-draft", "train-layer-draft", "train-policy", "train-text-lm", "train-tokenizer")


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


def test_numeric_options_of_the_decoding_commands_have_ranges(tmp_path) -> None:
    import click

    for command in ("train-text-lm", "train-layer-draft", "train-ar-policy", "bench-text", "bench-ar"):
        for param in main.commands[command].params:
            if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
                assert isinstance(param.type, (click.IntRange, click.FloatRange)), (command, param.name)
    result = CliRunner().invoke(main, ["bench-text", "--lm", str(tmp_path), "--draft", str(tmp_path), "--gamma", "0"])
    assert result.exit_code == 2 and "--gamma" in result.output


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


ZERO_OR_NEGATIVE = [
    (["collect-features", "--shard-size", "0"], "--shard-size"),
    (["collect-features", "--batch-size", "0"], "--batch-size"),
    (["collect-features", "--exit-layer", "-1"], "--exit-layer"),
    (["bench-latency", "--iters", "0"], "--iters"),
    (["bench-latency", "--warmup", "-1"], "--warmup"),
    (["bench-latency", "--acceptance", "1.5"], "--acceptance"),
    (["bench-latency", "--tau", "-1"], "--tau"),
    (["bench-latency", "--tau", "abc"], "--tau"),
    (["bench-latency", "--exit-layers", "2,-1"], "--exit-layers"),
    (["train-tokenizer", "--epochs", "0"], "--epochs"),
    (["train-policy", "--batch-size", "0"], "--batch-size"),
    (["train-draft", "--lr", "0"], "--lr"),
    (["train-draft", "--kl-weight", "-0.1"], "--kl-weight"),
    (["train-draft", "--seed", "-1"], "--seed"),
    (["calibrate", "--alpha", "0"], "--alpha"),
    (["calibrate", "--delta", "1"], "--delta"),
    (["calibrate", "--tolerance", "0"], "--tolerance"),
    (["calibrate", "--min-steps", "0"], "--min-steps"),
    (["eval", "--episodes", "0"], "--episodes"),
    (["eval", "--tau", "1.5"], "--tau"),
    (["eval", "--image-size", "0"], "--image-size"),
    (["eval", "--replan-every", "0"], "--replan-every"),
    (["generate-demos", "--episodes", "0"], "--episodes"),
    (["synthetic-actions", "--episodes", "-5"], "--episodes"),
    (["export-draft", "--opset", "5"], "--opset"),
]


@pytest.mark.parametrize(("args", "option"), ZERO_OR_NEGATIVE, ids=[" ".join(a) for a, _ in ZERO_OR_NEGATIVE])
def test_zero_or_negative_values_are_refused_before_anything_runs(args: list[str], option: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and f"Invalid value for '{option}" in result.output, result.output
    assert "Traceback" not in result.output


def test_a_bug_is_one_line_with_its_own_status_and_a_traceback_under_debug(monkeypatch, tmp_path) -> None:
    def broken(name: str):
        raise KeyError("p50")

    monkeypatch.setattr("rsd.cli.get_preset", broken)
    result = CliRunner().invoke(main, ["presets", "tiny"])
    assert result.exit_code == EXIT_BUG and "internal error, a bug in rsd (KeyError: 'p50')" in result.output
    assert "--debug" in result.output and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["--debug", "presets", "tiny"])
    assert isinstance(result.exception, KeyError) and result.exit_code == 1
    assert get_preset("tiny").name == "tiny"


def test_dart_noise_reaches_the_recorder_and_the_file_keeps_clean_actions(tmp_path) -> None:
    from rsd.data.hdf5 import read_demos
    from rsd.envs.expert import ScriptedExpert
    from rsd.envs.tabletop import TabletopEnv

    files = {}
    for noise in ("0", "0.3"):
        files[noise] = tmp_path / f"d{noise}.hdf5"
        result = CliRunner().invoke(main, ["generate-demos", "--episodes", "2", "--seed", "3", "--noise", noise, "--out", str(files[noise])])
        assert result.exit_code == 0, result.output
    clean, noisy = read_demos(files["0"]), read_demos(files["0.3"])
    assert any(len(a) != len(b) or not (a.actions == b.actions).all() for a, b in zip(clean, noisy, strict=True))  # the noise changed the states visited
    env = TabletopEnv()
    expert = ScriptedExpert(env)
    episode = noisy[0]
    env.reset(3)
    env.gripper = episode.proprio[5, :3].astype(float).copy()  # the recorded action is what the clean expert does in the recorded state
    assert env.held is None and episode.proprio[5, 6] > 0.0399  # still open and empty-handed at step 5
    assert abs(expert.act()[:3] - episode.actions[5, :3]).max() < 1e-5
    result = CliRunner().invoke(main, ["generate-demos", "--env", "libero:libero_spatial", "--noise", "0.1", "--out", str(tmp_path / "l.hdf5")])
    assert result.exit_code == 2 and "--noise, --policy and --aggregate apply to" in result.output
    result = CliRunner().invoke(main, ["generate-demos", "--camera", "agentview", "--out", str(tmp_path / "t.hdf5")])
    assert result.exit_code == 2 and "--camera applies to robosuite" in result.output


def test_dagger_demos_aggregate_the_earlier_file_and_start_where_the_policy_left(tmp_path) -> None:
    import numpy as np

    from rsd.data.hdf5 import read_demos, read_provenance
    from rsd.envs.tabletop import TabletopEnv

    make_tiny_main().save(tmp_path / "policy")
    earlier, out = tmp_path / "earlier.hdf5", tmp_path / "dagger.hdf5"
    assert CliRunner().invoke(main, ["generate-demos", "--episodes", "2", "--out", str(earlier)]).exit_code == 0
    result = CliRunner().invoke(main, ["generate-demos", "--episodes", "3", "--seed", "20", "--policy", str(tmp_path / "policy"),
                                       "--handover", "12", "--replan-every", "4", "--aggregate", str(earlier), "--out", str(out), "--batch", "2"])
    assert result.exit_code == 0, result.output
    assert "starts with 2 episodes" in result.output
    before, after = read_demos(earlier), read_demos(out)
    assert all(np.array_equal(a.actions, b.actions) for a, b in zip(before, after[:2], strict=True))
    starts = [TabletopEnv().reset(seed)["proprio"] for seed in (20, 21, 22)]
    new = after[2:]
    assert new and all(not any(np.array_equal(e.proprio[0], p) for p in starts) for e in new)  # recorded from where the policy left
    expert_run, recovery_run = read_provenance(out)  # which demo ids are recovery episodes, and how they were made
    assert expert_run == {"first_demo": 0, "end_demo": 2, "seeds": [0, 1], "noise": 0.0, "learner": None, "handover": None}
    assert recovery_run == {"first_demo": 2, "end_demo": len(after), "seeds": [20, 22], "noise": 0.0,
                            "learner": {"policy": str(tmp_path / "policy"), "replan_every": 4}, "handover": 12}
    result = CliRunner().invoke(main, ["generate-demos", "--handover", "5", "--out", str(tmp_path / "x.hdf5")])
    assert result.exit_code == 2 and "pass --policy too" in result.output
    result = CliRunner().invoke(main, ["generate-demos", "--replan-every", "4", "--out", str(tmp_path / "x.hdf5")])
    assert result.exit_code == 2 and "pass --policy too" in result.output
    result = CliRunner().invoke(main, ["generate-demos", "--batch", "4", "--out", str(tmp_path / "x.hdf5")])
    assert result.exit_code == 2 and "--batch is how many of --policy's episodes" in result.output
    from rsd.envs.demos import _learner

    assert _learner(tmp_path / "policy", 4).replan_every == 4 and _learner(tmp_path / "policy").replan_every == 8  # the steering policy's horizon


def test_train_policy_options_reach_the_trainer(monkeypatch, tmp_path) -> None:
    seen = {}

    def fake(data, tokenizer, out, preset, train, freeze_backbone=False, **kwargs):
        seen.update(options=kwargs["options"], batch=train.batch_size, warmup=train.warmup)
        return {"best": {}, "fingerprint": "x"}

    monkeypatch.setattr("rsd.training.policy.train_policy", fake)
    data = tmp_path / "d.hdf5"
    assert CliRunner().invoke(main, ["generate-demos", "--episodes", "1", "--out", str(data)]).exit_code == 0
    (tmp_path / "tok").mkdir()
    result = CliRunner().invoke(main, ["train-policy", "--data", str(data), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "p"),
                                       "--shift", "2", "--rollout-every", "4", "--rollout-episodes", "10", "--batch-size", "64",
                                       "--rollout-replan-every", "4", "--warmup", "0.3", "--ema-decay", "0.99", "--object-loss", "0.5",
                                       "--select-alpha", "0.1", "--rollout-batch", "8"])
    assert result.exit_code == 0, result.output
    options = seen["options"]
    assert (options.shift, options.rollout_every, options.rollout_episodes, options.select_by, seen["batch"]) == (2, 4, 10, "rollouts", 64)
    assert (options.rollout_replan_every, options.ema_decay, seen["warmup"], options.object_loss, options.select_alpha) == (4, 0.99, 0.3, 0.5, 0.1)
    assert options.rollout_batch == 8


def test_eval_replans_after_the_steps_asked_for(tmp_path) -> None:
    """`--replan-every 3` executes three steps of each 8-step chunk: one chunk per three steps, the last one cut by the episode's end."""
    make_tiny_main(seed=5).save(tmp_path / "policy")
    chunks = {}
    for replan in (None, 3):
        out = tmp_path / f"replan{replan}.json"
        extra = [] if replan is None else ["--replan-every", str(replan)]
        result = CliRunner().invoke(main, ["eval", "--policy", str(tmp_path / "policy"), "--episodes", "2", "--seed", "300", "--device", "cpu",
                                           "--json", str(out), *extra])
        assert result.exit_code == 0, result.output
        report = json.loads(out.read_text())["baseline"]
        chunks[replan] = (report["chunks"], sum(-(-e["length"] // (replan or 8)) for e in report["episodes"]))
    assert chunks[None][0] == chunks[None][1] and chunks[3][0] == chunks[3][1] > chunks[None][0]
    out = tmp_path / "batch.json"
    result = CliRunner().invoke(main, ["eval", "--policy", str(tmp_path / "policy"), "--episodes", "2", "--seed", "300", "--device", "cpu",
                                       "--json", str(out), "--replan-every", "3", "--batch", "2"])  # both episodes side by side
    assert result.exit_code == 0, result.output
    batched = json.loads(out.read_text())["baseline"]
    assert batched["episodes"] == json.loads((tmp_path / "replan3.json").read_text())["baseline"]["episodes"]
    assert batched["chunks"] == chunks[3][0] and batched["latency_ms"] is None


def test_eval_renders_at_the_policy_image_size(monkeypatch, tmp_path) -> None:
    from conftest import make_tiny_main

    make_tiny_main().save(tmp_path / "policy")
    seen = {}

    def compare(main_model, env_name, seeds, **kwargs):
        seen.update(env=env_name, env_kwargs=kwargs["env_kwargs"], seeds=list(seeds))
        return {}

    monkeypatch.setattr("rsd.envs.evaluate.compare_policies", compare)
    result = CliRunner().invoke(main, ["eval", "--policy", str(tmp_path / "policy"), "--env", "robosuite:Lift", "--episodes", "2"])
    assert result.exit_code == 0, result.output
    assert seen == {"env": "robosuite:Lift", "env_kwargs": {"image_size": 64}, "seeds": [10_000, 10_001]}


def test_console_scripts_handle_errors_the_same_way(monkeypatch, capsys) -> None:
    from rsd.cli import bench_latency_main
    from rsd.errors import ConfigError

    def run(*args: str) -> int:
        monkeypatch.setattr("sys.argv", ["bench-latency", *args])
        with pytest.raises(SystemExit) as stopped:
            bench_latency_main()
        return stopped.value.code

    assert run("--iters", "0") == 2 and "Invalid value for '--iters'" in capsys.readouterr().err
    monkeypatch.setattr("rsd.bench.latency.run_bench_latency", lambda *a, **k: (_ for _ in ()).throw(ConfigError("no bundle")))
    assert run("--preset", "tiny") == 1 and capsys.readouterr().err.strip() == "Error: ConfigError: no bundle"
    monkeypatch.setattr("rsd.bench.latency.run_bench_latency", lambda *a, **k: {}["p50"])
    assert run("--preset", "tiny") == EXIT_BUG and "internal error" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["bench-latency", "--preset", "tiny", "--debug"])
    with pytest.raises(KeyError, match="p50"):
        bench_latency_main()
