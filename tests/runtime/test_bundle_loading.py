"""Bundle loading: a bundle written by an earlier rsd (the committed fixture) verifies, loads every engine and runs.

`tests/fixtures/old_bundle` was written at commit 4a9e472, before the runtime/export restructure, by
`tests/fixtures/make_old_bundle.py` (its docstring says how to regenerate it): ONNX and TorchScript engines of a
narrow draft that reads the tiny preset's main model at exit layer 3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_observation, make_tiny_main

from rsd.bundle import verify_bundle
from rsd.errors import CheckpointError
from rsd.io import FORMAT_VERSION
from rsd.runtime.bundle import available_engines, load_bundle_engines
from rsd.runtime.gate import Gate
from rsd.runtime.policy import SpeculativePolicy

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "old_bundle"
FINGERPRINT = "old-bundle-fixture"


@pytest.fixture()
def main_model():
    """A tiny main model of the width the fixture's draft reads (128, the preset's before 2026-11-26), with the fingerprint
    the fixture was exported for."""
    main = make_tiny_main(hidden_size=128)
    main.fingerprint = FINGERPRINT
    return main


def test_old_bundle_verifies_and_lists_its_engines() -> None:
    manifest = verify_bundle(FIXTURE)
    assert manifest["format_version"] == FORMAT_VERSION and manifest["rsd_version"] == "0.1.0"
    assert manifest["main_fingerprint"] == FINGERPRINT and manifest["exit_layer"] == 3
    assert available_engines(FIXTURE, "cpu") == ["onnx", "torchscript", "torch"]


def test_every_engine_of_the_old_bundle_computes_what_its_weights_compute(main_model) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 128, generator=generator)
    tokens = torch.randint(0, 7, (5, 8, 16, 8), generator=generator)
    outputs = {}
    for engine in ("torch", "onnx", "torchscript"):
        loaded = load_bundle_engines(FIXTURE, main_model, engine=engine)
        assert loaded.engine == engine and loaded.exit_layer == 3
        assert loaded.gate == Gate(tau=np.inf, mode="chunk", statistic="mean")  # from the old tau and gate_statistic fields
        outputs[engine] = loaded.draft(hidden), {c: loaded.decoders[c](tokens[..., :c]) for c in (3, 8)}
    (want_logits, want_tokens), want_actions = outputs["torch"]
    for engine in ("onnx", "torchscript"):  # the old graphs also output two confidences: the engines read logits and tokens
        (logits, draft_tokens), actions = outputs[engine]
        assert torch.equal(draft_tokens, want_tokens)
        assert (logits - want_logits).abs().max() < 1e-4
        for c in (3, 8):
            assert (actions[c] - want_actions[c]).abs().max() < 1e-5


def test_old_bundle_drives_the_speculative_policy(main_model) -> None:
    chunk = SpeculativePolicy.from_bundle(FIXTURE, main=main_model, tau=0.0).predict_chunk(make_observation())
    assert chunk.accepted and chunk.steps == 8 and chunk.actions.shape == (8, 7) and np.isfinite(chunk.actions).all()
    prefix = Gate(tau=0.0, mode="prefix", statistic="step", min_steps=2)
    policy = SpeculativePolicy.from_bundle(FIXTURE, main=main_model, engine="onnx", gate=prefix)
    assert policy.engine.gate == prefix and policy.predict_chunk(make_observation()).steps == 8


def test_old_bundle_refuses_another_main_model() -> None:
    with pytest.raises(CheckpointError, match=FINGERPRINT):
        load_bundle_engines(FIXTURE, make_tiny_main(), engine="torch")
