"""Fixtures and helpers of the decoding tests: a briefly trained tiny text LM, a briefly trained tiny AR-mode VLA policy,
a random AR-mode VLA and a draft of it that gets rejected now and then.

Import them into a test module (`from decoding_fixtures import text_lm_dir`). The trained ones train in seconds on
real data (a few standard-library files; four tabletop demonstrations) with the real training functions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model_at_width

from rsd.data.stats import ActionStats, DatasetStatistics
from rsd.models.ar_actions import ARActionModel, BinActionTokenizer, BinTokenizerConfig, ar_vla_config
from rsd.models.layer_draft import LayerDraft, LayerDraftConfig
from rsd.models.vla import PrismaticVLA
from rsd.presets import get_preset

TEXT_FILES = 12  # standard-library files the test LM sees (the BPE and the split are over these)


def text_files() -> list[Path]:
    """A fixed handful of standard-library sources that include held-out files and some long ones (knowledge windows)."""
    from rsd.training.text_lm import split_files, stdlib_sources

    files = stdlib_sources()
    _, held = split_files(files)
    longest = sorted(files, key=lambda f: f.stat().st_size)[-3:]
    return sorted({*files[: TEXT_FILES - 5], *held[:2], *longest})


@pytest.fixture(scope="session")
def text_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer Qwen3 LM (the `qwen3-test` preset) trained for 30 steps on `text_files()`."""
    from rsd.training.text_lm import TextTrainConfig, train_text_lm

    out = tmp_path_factory.mktemp("text_lm")
    torch.manual_seed(0)
    train_text_lm(out, "qwen3-test", TextTrainConfig(steps=30, seq_len=64, batch_size=8, lr=1e-2, warmup=5, val_windows=2), files=text_files(), progress=False)
    return out


@pytest.fixture(scope="session")
def ar_policy_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(AR policy folder, demos file): the tiny preset in OpenVLA's action mode, one epoch on four tabletop demos."""
    from rsd.envs.demos import generate_demos
    from rsd.training.ar_policy import train_ar_policy

    out = tmp_path_factory.mktemp("ar")
    demos = out / "demos.hdf5"
    generate_demos("tabletop", 4, demos, seed=0)
    train = dataclasses.replace(get_preset("tiny").policy_train, epochs=1, batch_size=32, val_fraction=0.25)
    train_ar_policy(demos, out / "policy", "tiny", train, progress=False)
    return out / "policy", demos


def tiny_ar_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> ARActionModel:
    """A tiny AR-mode VLA with seeded random weights and statistics spanning [-2, 2] (so un-normalisation shows), at LLM
    width 128: with random weights at the preset's 64 the scrambled draft below is never rejected."""
    torch.manual_seed(seed)
    config = ar_vla_config(tiny_model_at_width(128))
    vla = PrismaticVLA(config).to(dtype).eval()
    rng = np.random.default_rng(seed)
    stats = DatasetStatistics(action=ActionStats.from_actions(rng.uniform(-2.0, 2.0, size=(500, 7))))
    return ARActionModel(vla, BinActionTokenizer(BinTokenizerConfig(vocab_size=config.llm.vocab_size)), stats, "test")


def scrambled_action_draft(model: ARActionModel, layers: tuple[int, ...] = (0, 1, 2, 3, 5), seed: int = 0) -> LayerDraft:
    """A draft over the model's action ids whose transitions are random, so it is sometimes rejected."""
    target = model.vla.language_model
    config = model.tokenizer.config
    draft = LayerDraft(LayerDraftConfig.for_target(target, layers, transition_size=32, token_offset=config.token_offset,
                                                   vocab_size=config.num_bins), target)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for transition in draft.transitions:
            if hasattr(transition, "up"):
                transition.up.weight.copy_(torch.randn(transition.up.weight.shape, generator=generator, dtype=transition.up.weight.dtype) * 0.3)
    return draft.eval()
