"""Feature collection, draft training and calibration on the tiny preset (real components, seeded)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from rsd.errors import CheckpointError, ConfigError
from rsd.models.draft import DraftHead
from rsd.presets import get_preset
from rsd.training.calibrate import calibrate, gate_outcome, risk_curve, summarize_gate
from rsd.training.draft import distillation_loss, train_draft
from rsd.training.features import collect_features, load_features


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A saved tiny main model (random weights), 8 demo episodes and a features folder at exit layer 3."""
    from conftest import make_tiny_main

    from rsd.envs.demos import generate_demos

    root = tmp_path_factory.mktemp("pipeline")
    main = make_tiny_main(seed=3)
    main.save(root / "policy")
    generate_demos("tabletop", episodes=8, out=root / "demos.hdf5", seed=0, progress=False)
    collect_features(root / "policy", root / "demos.hdf5", 3, root / "features", shard_size=64, progress=False)
    return root


def test_features_hold_every_frame_with_the_right_shapes(pipeline) -> None:
    feats = load_features(pipeline / "features")
    frames = feats.exit_hidden.shape[0]
    assert feats.exit_hidden.shape == (frames, get_preset("tiny").model.llm.hidden_size) and feats.exit_hidden.dtype == torch.float16
    assert feats.main_logits.shape == (frames, 3, 128, 7)
    assert feats.main_tokens.shape == feats.gt_tokens.shape == (frames, 8, 128)
    assert feats.exit_layer == 3 and len(set(feats.episode_id.tolist())) == 8


def test_collect_features_resumes_without_recomputing_finished_shards(pipeline) -> None:
    index = json.loads((pipeline / "features" / "index.json").read_text())
    first = pipeline / "features" / index["shards"][0]["file"]
    before = first.stat().st_mtime_ns
    last = pipeline / "features" / index["shards"][-1]["file"]
    last.unlink()
    result = collect_features(pipeline / "policy", pipeline / "demos.hdf5", 3, pipeline / "features", shard_size=64, progress=False)
    assert result["computed_frames"] == index["shards"][-1]["frames"]
    assert first.stat().st_mtime_ns == before and last.is_file()
    load_features(pipeline / "features")


def test_features_of_another_model_or_exit_layer_cannot_be_mixed(pipeline, tmp_path) -> None:
    from conftest import make_tiny_main

    make_tiny_main(seed=4).save(tmp_path / "other")
    with pytest.raises(CheckpointError, match="main_fingerprint"):
        collect_features(tmp_path / "other", pipeline / "demos.hdf5", 3, pipeline / "features", shard_size=64, progress=False)
    with pytest.raises(CheckpointError, match="exit_layer"):
        collect_features(pipeline / "policy", pipeline / "demos.hdf5", 2, pipeline / "features", shard_size=64, progress=False)


def test_bad_sizes_are_refused_before_anything_is_written(pipeline) -> None:
    for sizes in ({"shard_size": 0}, {"batch_size": 0}, {"shard_size": -3}):
        with pytest.raises(ConfigError, match="expected an int >= 1"):
            collect_features(pipeline / "policy", pipeline / "demos.hdf5", 3, pipeline / "fresh", progress=False, **sizes)
    assert not (pipeline / "fresh").exists()


def test_a_few_training_steps_reduce_the_loss(pipeline) -> None:
    feats = load_features(pipeline / "features")
    torch.manual_seed(0)
    draft = DraftHead(get_preset("tiny").draft(3))
    optimizer = torch.optim.AdamW(draft.parameters(), lr=1e-3)
    rows = torch.arange(64)
    target = feats.main_tokens[rows, :3]

    def loss() -> torch.Tensor:
        return distillation_loss(draft.forward_logits(feats.exit_hidden[rows].float()), feats.main_logits[rows], target)[0]

    first = loss().item()
    for _ in range(20):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.8 * first


@pytest.fixture(scope="module")
def trained_draft(pipeline):
    from rsd.config import TrainConfig

    summary = train_draft(pipeline / "features", pipeline / "draft", "tiny", TrainConfig(epochs=12, batch_size=32, lr=2e-3, val_fraction=0.25),
                          progress=False)
    return pipeline / "draft", summary


def test_train_draft_writes_the_checkpoint_and_metrics(trained_draft) -> None:
    directory, summary = trained_draft
    assert len(summary["history"]) == 12 and 0.0 <= summary["best"]["val_agreement"] <= 1.0
    meta = json.loads((directory / "draft.json").read_text())
    assert meta["config"]["exit_layer"] == 3 and meta["config"]["hidden_size"] == get_preset("tiny").model.llm.hidden_size and meta["main_fingerprint"]
    assert json.loads((directory / "metrics.json").read_text())["parameters"] == summary["parameters"]


def test_draft_without_input_projection_is_refused(trained_draft, tmp_path) -> None:
    import shutil

    from rsd.io import sha256_file

    directory, _ = trained_draft
    shutil.copytree(directory, tmp_path / "draft")
    tensors = {k: v for k, v in load_file(str(tmp_path / "draft" / "draft.safetensors")).items() if not k.startswith("input_projection")}
    save_file(tensors, str(tmp_path / "draft" / "draft.safetensors"))
    meta = json.loads((tmp_path / "draft" / "draft.json").read_text())
    meta["weights_sha256"] = sha256_file(tmp_path / "draft" / "draft.safetensors")
    (tmp_path / "draft" / "draft.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="input_projection"):
        DraftHead.load(tmp_path / "draft")


def test_draft_for_another_hidden_size_or_exit_layer_is_refused(trained_draft) -> None:
    directory, _ = trained_draft
    with pytest.raises(CheckpointError, match="hidden size"):
        DraftHead.load(directory, expect_hidden=4096)
    with pytest.raises(CheckpointError, match="exit layer"):
        DraftHead.load(directory, expect_exit_layer=5)


def test_coverage_falls_as_tau_rises_and_the_curve_is_well_formed(trained_draft, pipeline) -> None:
    directory, _ = trained_draft
    report = calibrate(directory, pipeline / "features", directory / "calibration.json", mode="chunk", plot=True)
    curve = [p for p in report["calibration"]["curve"] if p["accepted"] > 0]
    coverage = [p["coverage"] for p in curve]
    assert coverage == sorted(coverage, reverse=True) and coverage[0] == 1.0
    # The main model here has random weights, so whether confidence tracks agreement is left to the demo's sweep;
    # what must hold for any draft: every accepted chunk's agreement is a share, and the full-coverage point is all.
    assert all(0.0 <= p["agreement"] <= 1.0 for p in curve) and curve[0]["accepted"] == max(p["accepted"] for p in curve)
    assert (directory / "calibration.png").is_file()
    assert report["gate"]["mode"] == "chunk" and report["gate"]["statistic"] == "min"
    assert math.isinf(report["gate"]["tau"]) or 0.0 <= report["gate"]["tau"] <= 1.0


def test_calibrate_command_certifies_a_gate_and_reports_the_test_half(trained_draft, pipeline, tmp_path) -> None:
    from click.testing import CliRunner

    from rsd.cli import main as cli
    from rsd.runtime.gate import Gate

    directory, _ = trained_draft
    out = tmp_path / "calibration.json"
    args = ["calibrate", "--draft", str(directory), "--features", str(pipeline / "features"), "--out", str(out), "--alpha", "0.3",
            "--delta", "0.2", "--tolerance", "2.0", "--mode", "prefix", "--min-steps", "2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads(out.read_text())
    gate = Gate.from_json(report, str(out), chunk_len=8)
    assert gate.mode == "prefix" and gate.statistic == "step" and gate.min_steps == 2
    assert report["risk"]["alpha"] == 0.3 and report["risk"]["delta"] == 0.2 and report["risk"]["tolerance"] == 2.0
    assert set(report["calibration"]["episodes"]).isdisjoint(report["test"]["episodes"])
    assert report["calibration"]["risk"] <= report["risk"]["upper_bound"]
    for text in ("certified: with probability >= 0.80", "upper bound", "test half", f"tau {gate.tau:.4f}"):
        assert text in result.output
    bad = CliRunner().invoke(cli, [*args[:-4], "--mode", "chunk", "--statistic", "step"])
    assert bad.exit_code == 1 and "ConfigError" in bad.output and "('mean', 'min')" in bad.output
    capped = CliRunner().invoke(cli, [*args, "--max-steps", "4", "--overwrite"])
    assert capped.exit_code == 0, capped.output + repr(capped.exception)
    gate = Gate.from_json(json.loads(out.read_text()), str(out), chunk_len=8)
    assert gate.max_steps == 4 and "at least 2 steps, at most 4" in capped.output
    assert json.loads(out.read_text())["test"]["steps_per_accepted"] <= 4
    for extra in (["--max-steps", "1"], ["--max-steps", "9"]):
        refused = CliRunner().invoke(cli, [*args, *extra, "--overwrite"])
        assert refused.exit_code == 1 and "--max-steps: expected it with --mode prefix and in 2..8" in refused.output
    coarsest = CliRunner().invoke(cli, [*args, "--confidence-layers", "1", "--overwrite"])
    assert coarsest.exit_code == 0 and "of the coarsest 1 layer" in coarsest.output
    assert Gate.from_json(json.loads(out.read_text()), str(out), coarse_layers=3).layers == 1
    refused = CliRunner().invoke(cli, [*args, "--confidence-layers", "4", "--overwrite"])
    assert refused.exit_code == 1 and "--confidence-layers: expected an int in 1..3" in refused.output


def measurements(mean, step, step_error, agreement):
    """DraftMeasurements of known values (`min` is the min of the step confidences, episodes all 0)."""
    import numpy as np

    from rsd.training.calibrate import DraftMeasurements

    step = np.asarray(step, dtype=np.float64)
    return DraftMeasurements(mean=np.asarray(mean, dtype=np.float64), min=step.min(axis=1), step=step,
                             step_error=np.asarray(step_error, dtype=np.float64), agreement=np.asarray(agreement, dtype=np.float64),
                             episode=np.zeros(len(step), dtype=np.int64))


def test_risk_curve_counts_exactly() -> None:
    from rsd.runtime.gate import Gate

    measured = measurements(mean=[0.1, 0.5, 0.9, 0.95], step=[[0.5, 0.5]] * 4, step_error=[[2.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.5, 0.5]],
                            agreement=[0.2, 0.6, 0.9, 1.0])
    at = {t: summarize_gate(measured, Gate(tau=t, statistic="mean"), tolerance=1.0) for t in (0.1, 0.5, 0.9, math.inf)}
    curve = risk_curve(measured, Gate(statistic="mean"), tolerance=1.0)
    assert curve[0]["accepted"] == 4 and curve[-1]["tau"] == math.inf and curve[-1]["accepted"] == 0
    assert [p["accepted"] for p in curve] == sorted((p["accepted"] for p in curve), reverse=True)
    assert [at[t]["accepted"] for t in (0.1, 0.5, 0.9, math.inf)] == [4, 3, 2, 0]
    assert [at[t]["risk"] for t in (0.1, 0.5, 0.9, math.inf)] == [0.5, 0.25, 0.0, 0.0]
    assert at[0.5]["risk_given_accepted"] == pytest.approx(1 / 3) and at[0.9]["agreement"] == pytest.approx(0.95)


def test_prefix_risk_counts_only_the_accepted_steps() -> None:
    from rsd.runtime.gate import Gate

    measured = measurements(mean=[0.9] * 3, step=[[0.9, 0.8, 0.3, 0.9], [0.9, 0.9, 0.9, 0.9], [0.2, 0.9, 0.9, 0.9]],
                            step_error=[[0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 0.0, 5.0], [5.0, 0.0, 0.0, 0.0]], agreement=[1.0] * 3)
    gate = Gate(tau=0.5, mode="prefix", statistic="step", min_steps=2)
    summary = summarize_gate(measured, gate, tolerance=1.0)
    # row 0: steps 0-1 accepted, its bad steps 2-3 are never executed; row 1: all four, step 3 bad; row 2 rejected
    assert summary["accepted"] == 2 and summary["steps_per_accepted"] == 3.0 and summary["risk"] == pytest.approx(1 / 3)
    confidence, outcome = gate_outcome(measured, gate, tolerance=1.0)
    assert confidence.tolist() == pytest.approx([0.8, 0.9, 0.2])
    assert outcome(0.85)[2].tolist() == [0, 4, 0]  # row 0 passes only its first step: fewer than min_steps
    executed = summarize_gate(measured, Gate(tau=0.5, mode="prefix", statistic="step", min_steps=2, max_steps=3), tolerance=1.0)
    assert executed["accepted"] == 2 and executed["steps_per_accepted"] == 2.5 and executed["risk"] == 0.0  # row 1's bad step 3 is not run
