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
