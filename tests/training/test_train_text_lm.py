"""The tiny text LM: stdlib corpus split, BPE, training that lowers the loss, and files that rebuild the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from decoding_fixtures import text_files, text_lm_dir  # noqa: F401  (session fixture)

from rsd.config import TextLMConfig
from rsd.errors import CheckpointError, ConfigError
from rsd.models.text_lm import load_text_lm
from rsd.training.text_lm import TextTrainConfig, split_files, stdlib_sources, train_text_lm


def test_split_is_fixed_and_disjoint() -> None:
    files = stdlib_sources()
    train, held = split_files(files)
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(files)
    assert 0.01 < len(held) / len(files) < 0.12
    assert split_files(files) == (train, held)
    assert not any("test" in f.parts[-2:-1] or "site-packages" in f.parts for f in files)


def test_training_lowers_the_loss_and_the_files_rebuild_the_model(text_lm_dir: Path) -> None:  # noqa: F811
    metrics = json.loads((text_lm_dir / "metrics.json").read_text())
    first = metrics["history"][0]["loss"]
    assert metrics["final_train_loss"] < first - 0.5  # from about ln(320) = 5.8
    assert metrics["held_out_files"] and metrics["steps"] == 30
    lm = load_text_lm(text_lm_dir)
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight  # tied, stored once
    assert lm.tokenizer.get_vocab_size() == lm.config.vocab_size == 320
    ids = lm.encode("def main():\n    return 0\n")
    assert lm.decode(ids[0].tolist()) == "def main():\n    return 0\n"
    again = load_text_lm(text_lm_dir)
    torch.testing.assert_close(again.model(input_ids=ids).logits, lm.model(input_ids=ids).logits, rtol=0, atol=0)


def test_resume_continues_from_the_saved_model(text_lm_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    metrics = train_text_lm(tmp_path / "more", train=TextTrainConfig(steps=3, seq_len=32, batch_size=2, val_windows=1),
                            files=text_files(), progress=False, resume=text_lm_dir)
    assert metrics["resumed_from"]["path"] == str(text_lm_dir)
    before = json.loads((text_lm_dir / "metrics.json").read_text())
    assert metrics["history"][0]["loss"] < before["history"][0]["loss"]  # starts from the trained weights, not from scratch
    assert metrics["fingerprint"] != before["fingerprint"]


def test_bad_configs_and_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        TextLMConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError):
        TextTrainConfig(steps=0)
    with pytest.raises(ConfigError):
        train_text_lm(tmp_path, "qwen3-tiny-typo")
    with pytest.raises(CheckpointError):
        load_text_lm(tmp_path)
