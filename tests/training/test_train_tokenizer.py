"""train-tokenizer: the error falls with layers, the saved tokenizer reloads exactly, the synthetic set reaches its bar."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from rsd.config import TokenizerConfig, TrainConfig
from rsd.data.synthetic import synthetic_action_episodes
from rsd.errors import CheckpointError
from rsd.presets import get_preset
from rsd.tokenizer import (
    ActionTokenizer,
)
from rsd.training.tokenizer import train_tokenizer

CONFIG = TokenizerConfig()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[ActionTokenizer, dict, list[np.ndarray]]:
    """A tokenizer trained for a few epochs on the synthetic action set (about 10 s)."""
    episodes = synthetic_action_episodes(60, seed=1)
    out = tmp_path_factory.mktemp("tokenizer")
    report = train_tokenizer(episodes, CONFIG, TrainConfig(epochs=8, batch_size=256, lr=3e-3), out, progress=False)
    return ActionTokenizer.load(out), report, episodes


def test_trained_tokenizer_error_falls_with_layers(trained) -> None:
    _, report, _ = trained
    mse = report["val_mse_by_layers"]
    assert len(mse) == CONFIG.num_layers
    assert mse[-1] < mse[0] / 3
    for coarse, fine in zip(mse, mse[1:], strict=False):
        assert fine <= coarse * (1 + 1e-3) + 1e-9, mse
    assert len(report["token_usage"]) == CONFIG.num_layers and len(report["val_max_error_per_dim"]) == CONFIG.action_dim
    assert set(report["val_episodes"]).isdisjoint(report["train_episodes"])


def test_save_load_round_trip_and_report_files(trained, tmp_path) -> None:
    tokenizer, _, episodes = trained
    tokenizer.save(tmp_path)
    loaded = ActionTokenizer.load(tmp_path)
    chunk = torch.as_tensor(episodes[0][:8][None])
    assert torch.equal(loaded.encode(chunk), tokenizer.encode(chunk))
    meta = json.loads((tmp_path / "tokenizer.json").read_text())
    assert meta["kind"] == "tokenizer" and meta["statistics"]["q01"] == list(tokenizer.stats.q01)


def test_other_format_version_is_refused(trained, tmp_path) -> None:
    tokenizer, _, _ = trained
    tokenizer.save(tmp_path)
    meta = json.loads((tmp_path / "tokenizer.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version"):
        ActionTokenizer.load(tmp_path)


def test_smooth_synthetic_set_reaches_the_target_mse(tmp_path) -> None:
    """The issue's bar: val MSE ≤ 1e-3 with c = L on the synthetic set (100 episodes, 6 epochs; about 15 s on 2 cores)."""
    spec = get_preset("tiny")
    episodes = synthetic_action_episodes(100, seed=0)
    train = dataclasses.replace(spec.tokenizer_train, epochs=6)
    report = train_tokenizer(episodes, spec.tokenizer, train, tmp_path, progress=False)
    assert report["val_mse_by_layers"][-1] <= 1e-3
    assert (tmp_path / "report.md").read_text().count("|") > 20


@pytest.mark.parametrize("content", ["empty", "garbage", "truncated"])
def test_unreadable_data_is_a_data_error_and_writes_nothing(tmp_path, content: str) -> None:
    from click.testing import CliRunner

    from rsd.cli import main
    from rsd.data.dataset import Episode
    from rsd.data.hdf5 import write_demos
    from rsd.errors import DataError
    from rsd.training.tokenizer import train_tokenizer_from_file

    path = tmp_path / "demos.hdf5"
    if content == "empty":
        path.write_bytes(b"")
    elif content == "garbage":
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    else:
        rng = np.random.default_rng(0)
        episodes = [Episode(i, "pick up the block", rng.uniform(-1, 1, (40, 7)).astype(np.float32),
                            {"agentview": rng.integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)}) for i in range(3)]
        write_demos(tmp_path / "whole.hdf5", episodes, env_name="tabletop")
        path.write_bytes((tmp_path / "whole.hdf5").read_bytes()[:4096])
    with pytest.raises(DataError, match="demos.hdf5.*HDF5"):
        train_tokenizer_from_file(path, tmp_path / "tokenizer", progress=False)
    result = CliRunner().invoke(main, ["train-tokenizer", "--data", str(path), "--out", str(tmp_path / "tokenizer")])
    assert result.exit_code == 1 and "DataError" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "tokenizer").exists()


def test_a_corrupt_action_is_refused_not_clipped(tmp_path) -> None:
    from rsd.errors import DataError

    episodes = synthetic_action_episodes(8, seed=3)
    episodes[5][7, 2] = 1e30
    with pytest.raises(DataError, match=r"episode 5 step 7 action dim 2.*1e\+30"):
        train_tokenizer(episodes, CONFIG, TrainConfig(epochs=1), tmp_path / "tokenizer", progress=False)
    assert not (tmp_path / "tokenizer").exists()
