"""The AOTInductor `.pt2` engine format: export, parity through the runtime's loader, hashes, device refusal.

The tiny draft and decoders are exported once per module with `torch.export` + AOTInductor (about a minute on two
cores, hence `slow`); the tests reload the packages through the bundle loader (no Python model code runs them)
and compare them with eager PyTorch at batch sizes other than the traced one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_observation, make_tiny_main, save_tiny_draft_sources

from rsd.bundle import verify_bundle, write_manifest
from rsd.errors import CheckpointError
from rsd.export import export_draft
from rsd.export.parity import ACTION_TOLERANCE, TOLERANCES
from rsd.runtime.bundle import available_engines, load_bundle_engines
from rsd.runtime.engines import AOTIDraftEngine
from rsd.runtime.gate import top_probability
from rsd.runtime.policy import SpeculativePolicy

pytestmark = pytest.mark.slow
FINGERPRINT = "test-fp"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle with the tiny draft and decoders as AOTInductor packages (and ONNX, to compare formats)."""
    root = save_tiny_draft_sources(tmp_path_factory.mktemp("aoti"), FINGERPRINT)["root"]
    export_draft(root / "draft", root / "tokenizer", root / "bundle", formats=("aotinductor", "onnx"))
    return root / "bundle"


@pytest.fixture()
def main_model():
    """The tiny main model the bundle was made for."""
    main = make_tiny_main()
    main.fingerprint = FINGERPRINT
    return main


def test_pt2_entries_are_hashed_parity_checked_and_preferred(bundle: Path) -> None:
    manifest = verify_bundle(bundle)
    entries = [e for e in manifest["engines"] if e["format"] == "aotinductor"]
    assert {e["name"] for e in entries} == {"draft", "decoder_c3", "decoder_c8"}
    for entry in entries:
        assert entry["built"] and entry["aotinductor"] == {"device": "cpu"} and entry["files"][0]["path"].endswith(".pt2")
        assert len(entry["files"][0]["sha256"]) == 64
    draft = next(e for e in entries if e["name"] == "draft")
    assert draft["parity"]["token_agreement"] == 1.0 and draft["parity"]["logits_max_abs"] <= TOLERANCES["fp32"]["logits_max_abs"]
    assert available_engines(bundle, "cpu")[:2] == ["aotinductor", "onnx"]


@pytest.mark.parametrize("batch", [1, 5])
def test_loaded_packages_match_eager(bundle: Path, main_model, batch: int) -> None:
    generator = torch.Generator().manual_seed(batch)
    hidden = torch.randn(batch, main_model.hidden_size, generator=generator)
    tokens = torch.randint(0, 7, (batch, 8, 16, 8), generator=generator)
    packaged = load_bundle_engines(bundle, main_model, engine="aotinductor")
    eager = load_bundle_engines(bundle, main_model, engine="torch")
    assert isinstance(packaged.draft, AOTIDraftEngine)
    got, want = packaged.draft(hidden), eager.draft(hidden)
    assert torch.equal(got[1], want[1]) and got[1].dtype == torch.int64
    assert (got[0] - want[0]).abs().max() <= TOLERANCES["fp32"]["logits_max_abs"]
    assert (top_probability(got[0]) - top_probability(want[0])).abs().max() <= TOLERANCES["fp32"]["confidence_max_abs"]
    for c in (3, 8):  # tokens[..., :3] is not contiguous: a package assumes its example's strides unless the engine fixes them
        assert (packaged.decoders[c](tokens[..., :c]) - eager.decoders[c](tokens[..., :c])).abs().max() <= ACTION_TOLERANCE


def test_tampered_package_is_refused(bundle: Path, tmp_path: Path, main_model) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / "draft.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "draft.pt2").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"draft\.pt2: expected sha256"):
        load_bundle_engines(copy, main_model, engine="aotinductor")


def test_packages_for_another_device_are_not_offered(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = verify_bundle(copy)
    for entry in manifest["engines"]:
        if entry["format"] == "aotinductor":
            entry["aotinductor"]["device"] = "cuda"
    write_manifest(copy, manifest)
    assert available_engines(copy, "cpu") == ["onnx", "torch"]


def test_speculative_policy_on_packages_matches_torch(bundle: Path, main_model) -> None:
    obs = make_observation(3)
    packaged = SpeculativePolicy.from_bundle(bundle, main=main_model, engine="aotinductor", tau=0.0).predict_chunk(obs)
    eager = SpeculativePolicy.from_bundle(bundle, main=main_model, engine="torch", tau=0.0).predict_chunk(obs)
    assert packaged.accepted and eager.accepted
    assert np.array_equal(packaged.tokens, eager.tokens) and np.abs(packaged.actions - eager.actions).max() <= ACTION_TOLERANCE
