"""export-segments: the tiny main model's embed, prefix, suffix and head as AOTInductor packages, loaded without the
model's Python code by the runtime, parity-checked, hashed, and refused when changed or made for another model.

The five packages are exported once per run (conftest's `tiny_segments`, about a minute and a half on two cores, hence `slow`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import SEGMENTS_EXIT, SEGMENTS_PROMPT, make_observation, make_tiny_main

from rsd.cli import main as cli
from rsd.errors import CheckpointError, EngineError
from rsd.export.parity import ACTION_TOLERANCE, TOLERANCES
from rsd.models.draft import DraftHead
from rsd.models.processor import observation_batch
from rsd.presets import get_preset
from rsd.runtime.compiled import CompileConfig, CompiledSegments
from rsd.runtime.engines import TorchDecoderEngine, TorchDraftEngine
from rsd.runtime.gate import Gate
from rsd.runtime.speculative import MainOnlyEngine, SpeculativeEngine

pytestmark = pytest.mark.slow
EXIT, PROMPT = SEGMENTS_EXIT, SEGMENTS_PROMPT


@pytest.fixture()
def packages(tiny_segments: Path) -> Path:
    """The tiny main model's segments at exit layer 3, packaged (once per run)."""
    return tiny_segments


def _engines(main, segments):
    torch.manual_seed(1)
    draft = TorchDraftEngine(DraftHead(get_preset("tiny").draft(EXIT)).eval())
    decoders = {c: TorchDecoderEngine(main.tokenizer.decoder_module(), c) for c in (3, 8)}
    return (SpeculativeEngine(main, draft, decoders, EXIT, Gate(tau=0.5), verify="always", segments=segments),
            SpeculativeEngine(main, draft, decoders, EXIT, Gate(tau=0.5), verify="always"))


def test_manifest_records_files_hashes_shapes_and_parity(packages: Path) -> None:
    manifest = json.loads((packages / "segments.json").read_text())
    assert manifest["kind"] == "main_segments" and manifest["exit_layer"] == EXIT and manifest["prompt_tokens"] == PROMPT
    assert [f["name"] for f in manifest["files"]] == ["embed", "layers_0_3", "readout_3", "readout_0", "head"]
    assert all(len(f["sha256"]) == 64 and (packages / f["path"]).is_file() for f in manifest["files"])
    assert manifest["parity"]["token_agreement"] == 1.0
    assert manifest["parity"]["hidden_max_abs"] <= TOLERANCES["fp32"]["logits_max_abs"]


def test_packaged_segments_match_eager_without_compiling(packages: Path) -> None:
    main = make_tiny_main()
    segments = CompiledSegments(main, CompileConfig(mode="aot", prompt_tokens=PROMPT, packages=str(packages)))
    packaged, eager = _engines(main, segments)
    for seed in range(4):
        obs = make_observation(seed, ["open the drawer", "pick up the red block and place it on the plate"][seed % 2])
        inputs = main.prepare(*observation_batch(obs, main.vla.config.proprio_dim))
        got, want = packaged.run(inputs), eager.run(inputs)
        assert torch.equal(got.accepted, want.accepted) and torch.equal(got.tokens, want.tokens)
        assert (got.actions - want.actions).abs().max() <= ACTION_TOLERANCE
    assert segments.describe()["graphs"] == 4 and segments.recompiles == 0
    decoder = TorchDecoderEngine(main.tokenizer.decoder_module(), 8)
    got, want = MainOnlyEngine(main, decoder, segments).run(inputs), MainOnlyEngine(main, decoder).run(inputs)
    assert torch.equal(got.tokens, want.tokens) and (got.actions - want.actions).abs().max() <= ACTION_TOLERANCE
    assert segments.describe()["graphs"] == 5  # the main-only path's readout_0 as well
    with pytest.raises(EngineError, match="expected a packaged segment 'layers_0_2'"):
        segments.advance(segments.embed(segments.prepare(inputs)), 2)


def test_changed_package_or_another_model_is_refused(packages: Path, tmp_path: Path) -> None:
    copy = tmp_path / "k3"
    shutil.copytree(packages, copy)
    data = bytearray((copy / "layers_0_3.pt2").read_bytes())
    data[len(data) // 3] ^= 0xFF
    (copy / "layers_0_3.pt2").write_bytes(bytes(data))
    config = CompileConfig(mode="aot", prompt_tokens=PROMPT, packages=str(copy))
    with pytest.raises(CheckpointError, match=r"layers_0_3\.pt2: expected sha256"):
        CompiledSegments(make_tiny_main(), config)
    other = make_tiny_main()
    other.fingerprint = "another-model"
    with pytest.raises(CheckpointError, match="main_fingerprint"):
        CompiledSegments(other, CompileConfig(mode="aot", prompt_tokens=PROMPT, packages=str(packages)))
    with pytest.raises(CheckpointError, match="prompt_tokens 24, expected 48"):
        CompiledSegments(make_tiny_main(), CompileConfig(mode="aot", packages=str(packages)))


def test_cli_refuses_an_exit_layer_out_of_range(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    make_tiny_main().save(policy)
    result = CliRunner().invoke(cli, ["export-segments", "--main", str(policy), "--exit-layer", "6", "--out", str(tmp_path / "s")])
    assert result.exit_code == 1 and "expected an int in 1..5, got 6" in result.output
