"""Every writer refuses to replace an artifact without --overwrite, and one killed mid-write leaves the old artifact whole.

One artifact of every kind is built once (tiny preset, 8 demonstrations); each writer is then run over it with
`overwrite=True` in a subprocess (`tests/fixtures/interrupted_writer.py`) that stops where the new artifact is
complete in its staging folder but not yet moved into place, and is killed there by its PID (SIGKILL, and SIGINT as
Ctrl-C sends it). The old artifact must be byte-identical afterwards and still load and verify.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rsd.config import PolicyTrainConfig, TrainConfig
from rsd.io import sha256_file

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "fixtures" / "interrupted_writer.py"
OUTPUTS = {"tokenizer": "tokenizer", "policy": "policy", "features": "features", "draft": "draft", "calibration": "draft",
           "bundle": "bundle", "demo": "demo"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demos.hdf5 and a tokenizer, policy, features, draft (with calibration), bundle and (stand-in) demo folder."""
    from rsd.envs.demos import generate_demos
    from rsd.export import export_draft
    from rsd.presets import get_preset
    from rsd.training.calibrate import calibrate
    from rsd.training.draft import train_draft
    from rsd.training.features import collect_features
    from rsd.training.policy import train_policy
    from rsd.training.tokenizer import train_tokenizer_from_file

    root = tmp_path_factory.mktemp("artifacts")
    generate_demos("tabletop", episodes=8, out=root / "demos.hdf5", progress=False)
    train_tokenizer_from_file(root / "demos.hdf5", root / "tokenizer", train=TrainConfig(epochs=2, batch_size=64), progress=False)
    short = dataclasses.replace(get_preset("tiny").policy_train, epochs=1, batch_size=64, val_fraction=0.25)
    train_policy(root / "demos.hdf5", root / "tokenizer", root / "policy", train=short, progress=False,
                 options=PolicyTrainConfig(select_by="val_l1"))
    collect_features(root / "policy", root / "demos.hdf5", 3, root / "features", shard_size=64, progress=False)
    train_draft(root / "features", root / "draft", train=short, progress=False)
    calibrate(root / "draft", root / "features", root / "draft" / "calibration.json")
    export_draft(root / "draft", root / "tokenizer", root / "bundle", formats=("torchscript",))
    (root / "demo").mkdir()
    (root / "demo" / "report.json").write_text(json.dumps({"quick": True}))
    (root / "demo" / "report.md").write_text("# rsd demo report\n")
    return root


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path, leaving out the hidden staging and temporary files killed writers left."""
    files = (p.relative_to(folder) for p in sorted(folder.rglob("*")) if p.is_file())
    return {f.as_posix(): sha256_file(folder / f) for f in files if not any(part.startswith(".") for part in f.parts)}


def loads(writer: str, root: Path) -> None:
    """Load (and so verify) the artifact `writer` writes, the way its users do."""
    if writer == "tokenizer":
        from rsd.tokenizer import ActionTokenizer

        ActionTokenizer.load(root / "tokenizer")
    elif writer == "policy":
        from rsd.models.main import MainModel

        MainModel.load(root / "policy")
    elif writer == "features":
        from rsd.training.features import load_features

        load_features(root / "features")
    elif writer == "draft":
        from rsd.models.draft import DraftHead

        DraftHead.load(root / "draft")
    elif writer == "calibration":
        assert json.loads((root / "draft" / "calibration.json").read_text())["kind"] == "calibration"
    elif writer == "bundle":
        from rsd.bundle import verify_bundle

        verify_bundle(root / "bundle")


def run_and_kill(writer: str, root: Path, hook: str, sig: signal.Signals, log: Path) -> int:
    """Start the writer, wait until it reports that it blocked, kill it by its PID with `sig`; return its exit status."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, str(RUNNER), writer, str(root), hook], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=stderr, text=True)
        line = process.stdout.readline()
        while line and not line.startswith("BLOCKED"):  # the writer's own output comes first
            line = process.stdout.readline()
        if not line.startswith("BLOCKED"):
            process.kill()
            process.wait()
            pytest.fail(f"{writer} did not reach its {hook} hook (said {line!r}): {log.read_text()[-2000:]}")
        assert int(line.split()[1]) == process.pid
        os.kill(process.pid, sig)
        return process.wait()


@pytest.mark.parametrize(("writer", "hook"), [("tokenizer", "fsync"), ("policy", "weights"), ("draft", "fsync"),
                                              ("calibration", "fsync"), ("bundle", "fsync"), ("demo", "fsync")])
def test_a_writer_killed_mid_write_leaves_the_old_artifact_whole(artifacts: Path, tmp_path: Path, writer: str, hook: str) -> None:
    out = artifacts / OUTPUTS[writer]
    before = snapshot(out)
    status = run_and_kill(writer, artifacts, hook, signal.SIGKILL, tmp_path / "stderr.txt")
    assert status == -signal.SIGKILL
    assert snapshot(out) == before
    loads(writer, artifacts)
    leftovers = [p.name for p in artifacts.iterdir() if p.name.startswith(f".{out.name}.")]
    assert all(".staging-" in name or name.endswith(".partial") for name in leftovers), leftovers


@pytest.mark.parametrize("writer", ["draft"])
def test_ctrl_c_mid_write_leaves_the_old_artifact_and_no_staging(artifacts: Path, tmp_path: Path, writer: str) -> None:
    out = artifacts / OUTPUTS[writer]
    before = snapshot(out)
    status = run_and_kill(writer, artifacts, "fsync", signal.SIGINT, tmp_path / "stderr.txt")
    assert status != 0 and "KeyboardInterrupt" in (tmp_path / "stderr.txt").read_text()
    assert snapshot(out) == before
    loads(writer, artifacts)
    assert not [p.name for p in artifacts.iterdir() if p.name.startswith(f".{out.name}.staging-")]


def cli_writes(root: Path) -> dict[str, list[str]]:
    """The command line of every writer, pointed at the existing artifact of its kind."""
    return {
        "tokenizer": ["train-tokenizer", "--data", str(root / "demos.hdf5"), "--out", str(root / "tokenizer"), "--epochs", "1"],
        "policy": ["train-policy", "--data", str(root / "demos.hdf5"), "--tokenizer", str(root / "tokenizer"), "--out", str(root / "policy"),
                   "--epochs", "1"],
        "draft": ["train-draft", "--features", str(root / "features"), "--out", str(root / "draft"), "--epochs", "1"],
        "calibration": ["calibrate", "--draft", str(root / "draft"), "--features", str(root / "features")],
        "bundle": ["export-draft", "--draft", str(root / "draft"), "--tokenizer", str(root / "tokenizer"), "--out", str(root / "bundle"),
                   "--formats", "torchscript"],
        "demo": ["demo", "--quick", "--out", str(root / "demo")],
        "demos": ["generate-demos", "--episodes", "1", "--out", str(root / "demos.hdf5")],
        "another kind": ["train-draft", "--features", str(root / "features"), "--out", str(root / "policy"), "--epochs", "1", "--overwrite"],
    }


def test_every_writer_refuses_an_existing_artifact_without_overwrite(artifacts: Path) -> None:
    """collect-features is the exception by design: it resumes a features folder in place, shard by shard (also across
    torchrun ranks), so over a complete folder it computes nothing and changes nothing (checked here too)."""
    from rsd.cli import main
    from rsd.training.features import collect_features

    features = snapshot(artifacts / "features")
    result = collect_features(artifacts / "policy", artifacts / "demos.hdf5", 3, artifacts / "features", shard_size=64, progress=False)
    assert result["computed_frames"] == 0 and snapshot(artifacts / "features") == features
    result = CliRunner().invoke(main, ["collect-features", "--policy", str(artifacts / "policy"), "--data", str(artifacts / "demos.hdf5"),
                                       "--exit-layer", "3", "--out", str(artifacts / "policy")])
    assert result.exit_code == 1 and "holding a policy" in result.output, result.output

    before = snapshot(artifacts)
    for writer, args in cli_writes(artifacts).items():
        result = CliRunner().invoke(main, args)
        expected = "holding a policy" if writer == "another kind" else "--overwrite"
        assert result.exit_code == 1 and expected in result.output and "Traceback" not in result.output, (writer, result.output)
    assert snapshot(artifacts) == before
