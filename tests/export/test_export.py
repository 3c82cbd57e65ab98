"""export-draft and the bundle: ONNX / TorchScript engines against eager PyTorch, hashes, refusals, the CLI.

A tiny draft (random weights, saved as a trained draft would be) and a tiny tokenizer are exported once per
module to ONNX and TorchScript (plus a TensorRT dry run); the tests reload the bundle through the runtime's
loader and compare it with the eager modules at batch sizes other than the traced one.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_observation, make_tiny_main, save_tiny_draft_sources
from safetensors.torch import save_file

from rsd.bundle import format_manifest, read_manifest, verify_bundle
from rsd.cli import main as cli
from rsd.errors import CheckpointError, DataError, EngineError, ParityError
from rsd.export import compile as compile_module
from rsd.export import export_draft
from rsd.export import exporter as exporter_module
from rsd.io import FORMAT_VERSION, sha256_file
from rsd.models.draft import DraftHead
from rsd.presets import get_preset
from rsd.runtime.bundle import available_engines, load_bundle_engines
from rsd.runtime.engines import OnnxSession, tensorrt_missing
from rsd.runtime.gate import Gate, top_probability
from rsd.runtime.policy import SpeculativePolicy
from rsd.tokenizer import ActionTokenizer, tokens_to_layers

FINGERPRINT = "test-fp"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved tiny draft (meta as `rsd train-draft` writes it) and a saved tiny tokenizer."""
    return save_tiny_draft_sources(tmp_path_factory.mktemp("sources"), FINGERPRINT)


@pytest.fixture(scope="module")
def bundle(sources: dict[str, Path]) -> Path:
    """ONNX + TorchScript engines and a TensorRT dry run of the tiny draft and decoders."""
    out = sources["root"] / "bundle"
    export_draft(sources["draft"], sources["tokenizer"], out, formats=("onnx", "torchscript", "tensorrt"), dry_run=True)
    return out


@pytest.fixture()
def main_model():
    """The tiny main model the bundle was made for (fingerprint set to the draft's)."""
    main = make_tiny_main()
    main.fingerprint = FINGERPRINT
    return main


def _entry(manifest: dict, name: str, fmt: str) -> dict:
    return next(e for e in manifest["engines"] if e["name"] == name and e["format"] == fmt)


def test_manifest_records_shapes_engines_and_parity(bundle: Path) -> None:
    manifest = verify_bundle(bundle)
    assert manifest["kind"] == "bundle" and manifest["format_version"] == FORMAT_VERSION
    assert manifest["main_fingerprint"] == FINGERPRINT and manifest["exit_layer"] == 3
    assert manifest["gate"] == {"tau": math.inf, "mode": "chunk", "statistic": "mean", "min_steps": 1, "max_steps": None, "layers": None} and manifest["calibrated"] is False
    assert manifest["shapes"]["coarse_layers"] == 3 and manifest["shapes"]["num_layers"] == 8
    for name in ("draft", "decoder_c3", "decoder_c8"):
        for fmt in ("onnx", "torchscript"):
            entry = _entry(manifest, name, fmt)
            assert entry["built"] and entry["export_seconds"] > 0 and entry["files"][0]["bytes"] > 0
            assert 1 in entry["parity"]["batch_sizes"] and 5 in entry["parity"]["batch_sizes"]
    assert _entry(manifest, "draft", "onnx")["parity"]["token_agreement"] == 1.0
    assert _entry(manifest, "draft", "onnx")["exporter"] == "dynamo"
    assert isinstance(_entry(manifest, "draft", "onnx")["opset"], int)
    assert _entry(manifest, "decoder_c3", "onnx")["precision"] == "fp32"
    for file in ("draft.safetensors", "draft.json", "tokenizer/tokenizer.json", "draft.onnx", "decoder_c8.ts"):
        assert (bundle / file).is_file()


def test_tensorrt_dry_run_plans_without_building(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    for name in ("draft", "decoder_c3", "decoder_c8"):
        entry = _entry(manifest, name, "tensorrt")
        assert entry["built"] is False and entry["files"] == []
        assert entry["planned_files"] == [f"{name}.trt.ep"] and entry["tensorrt"]["max_batch"] >= 1
    assert not list(bundle.glob("*.trt.ep"))
    assert "tensorrt" not in available_engines(bundle, "cpu")


@pytest.mark.parametrize("engine", ["onnx", "torchscript"])
@pytest.mark.parametrize("batch", [1, 5])
def test_reloaded_engines_match_eager(bundle: Path, sources: dict[str, Path], main_model, engine: str, batch: int) -> None:
    loaded = load_bundle_engines(bundle, main_model, engine=engine)
    assert loaded.engine == engine and loaded.draft.name == engine
    draft, _ = DraftHead.load(sources["draft"])
    tokenizer = ActionTokenizer.load(sources["tokenizer"])
    hidden = torch.randn(batch, main_model.hidden_size, generator=torch.Generator().manual_seed(batch))
    logits, tokens = loaded.draft(hidden)
    with torch.no_grad():
        want = draft(hidden)
    assert tokens.dtype == torch.int64 and logits.dtype == torch.float32
    assert torch.equal(tokens, want.tokens)
    assert (logits - want.logits).abs().max() < 1e-4
    assert (top_probability(logits) - top_probability(want.logits)).abs().max() < 1e-5  # what the gate reads
    full = torch.randint(0, 7, (batch, 8, 16, 8), generator=torch.Generator().manual_seed(7))
    for c in (3, 8):
        actions = loaded.decoders[c](full[..., :c])
        assert actions.shape == (batch, 8, 7) and actions.dtype == torch.float32
        assert (actions - tokenizer.decode(full[..., :c])).abs().max() < 1e-5


def test_available_engines_and_auto_choice(bundle: Path, main_model) -> None:
    assert available_engines(bundle, "cpu") == ["onnx", "torchscript", "torch"]
    loaded = load_bundle_engines(bundle, main_model)
    assert loaded.engine == "onnx" and loaded.exit_layer == 3 and loaded.gate == Gate(tau=math.inf)
    with pytest.raises(EngineError, match=r"tensorrt.*\['onnx', 'torchscript', 'torch'\]"):
        load_bundle_engines(bundle, main_model, engine="tensorrt")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="torch.cuda.is_available"):
            available_engines(bundle, "cuda")


def test_flipped_byte_fails_verification(bundle: Path, tmp_path: Path, main_model) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    target = copy / "draft.onnx"
    expected = sha256_file(target)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="draft.onnx") as info:
        verify_bundle(copy)
    assert expected in str(info.value) and sha256_file(target) in str(info.value)
    with pytest.raises(CheckpointError, match="draft.onnx"):
        load_bundle_engines(copy, main_model, engine="torch")
    result = CliRunner().invoke(cli, ["inspect", str(copy)])
    assert result.exit_code != 0 and "draft.onnx" in result.output


def test_inspect_prints_manifest(bundle: Path) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "test-fp" in result.output and "decoder_c8" in result.output and "all file hashes verified" in result.output


def test_bundle_for_another_main_model_is_refused(bundle: Path, main_model) -> None:
    main_model.fingerprint = "other"
    with pytest.raises(CheckpointError, match="'test-fp'.*'other'"):
        load_bundle_engines(bundle, main_model, engine="torch")


def test_tensorrt_without_cuda_fails_cleanly(sources: dict[str, Path], tmp_path: Path) -> None:
    if tensorrt_missing(torch.device("cuda")) is None:
        pytest.skip("CUDA and torch-tensorrt are present here; the refusal is for machines without them")
    with pytest.raises(EngineError, match="--dry-run"):
        export_draft(sources["draft"], sources["tokenizer"], tmp_path / "b", formats=("tensorrt",))
    assert not (tmp_path / "b").exists()


def test_onnx_without_a_provider_for_the_device_is_refused_before_writing(sources: dict[str, Path], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exporter_module, "runtime_available", lambda fmt, device: fmt != "onnx")
    with pytest.raises(EngineError, match="Export ONNX on the CPU"):
        export_draft(sources["draft"], sources["tokenizer"], tmp_path / "b", formats=("torchscript", "onnx"))
    assert not (tmp_path / "b").exists()


def test_calibration_of_another_model_is_refused(sources: dict[str, Path], tmp_path: Path) -> None:
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"tau": 0.9, "gate_statistic": "mean", "exit_layer": 3, "main_fingerprint": "other"}))
    with pytest.raises(CheckpointError, match="'other'.*'test-fp'"):
        export_draft(sources["draft"], sources["tokenizer"], tmp_path / "b", formats=("torchscript",), calibration=calibration)
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == [calibration]


def test_cli_export_with_an_older_calibration(sources: dict[str, Path], tmp_path: Path) -> None:
    """A calibration.json written before gates had modes (tau and gate_statistic) becomes a whole-chunk gate."""
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"tau": 0.25, "gate_statistic": "min", "exit_layer": 3, "main_fingerprint": FINGERPRINT}))
    out = tmp_path / "bundle"
    args = ["export-draft", "--draft", str(sources["draft"]), "--tokenizer", str(sources["tokenizer"]), "--calibration", str(calibration),
            "--out", str(out), "--formats", "torchscript"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "decoder_c8" in result.output
    manifest = verify_bundle(out)
    assert manifest["gate"] == {"tau": 0.25, "mode": "chunk", "statistic": "min", "min_steps": 1, "max_steps": None, "layers": None} and manifest["calibrated"] is True
    assert {e["format"] for e in manifest["engines"]} == {"torchscript"}
    assert "chunk gate, tau 0.2500 on the min confidence" in CliRunner().invoke(cli, ["inspect", str(out)]).output


def test_prefix_gate_of_the_calibration_reaches_the_runtime(sources: dict[str, Path], tmp_path: Path, main_model) -> None:
    gate = Gate(tau=0.4, mode="prefix", statistic="step", min_steps=3, max_steps=4, layers=1)
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"gate": gate.to_json(), "exit_layer": 3, "main_fingerprint": FINGERPRINT}))
    export_draft(sources["draft"], sources["tokenizer"], tmp_path / "bundle", formats=("torchscript",), calibration=calibration)
    assert load_bundle_engines(tmp_path / "bundle", main_model, engine="torchscript").gate == gate
    assert ("prefix gate, tau 0.4000 on the step confidence of the coarsest 1 layer, at least 3 steps, at most 4"
            in format_manifest(read_manifest(tmp_path / "bundle")))
    calibration.write_text(json.dumps({"gate": {**gate.to_json(), "layers": 4}, "exit_layer": 3, "main_fingerprint": FINGERPRINT}))
    with pytest.raises(CheckpointError, match="at most the draft's 3 coarse layers, got layers 4"):
        export_draft(sources["draft"], sources["tokenizer"], tmp_path / "b3", formats=("torchscript",), calibration=calibration)
    calibration.write_text(json.dumps({"gate": {**gate.to_json(), "min_steps": 9, "max_steps": None}, "exit_layer": 3,
                                       "main_fingerprint": FINGERPRINT}))
    with pytest.raises(CheckpointError, match="at most the chunk length 8, got 9"):
        export_draft(sources["draft"], sources["tokenizer"], tmp_path / "b2", formats=("torchscript",), calibration=calibration)


def test_parity_failure_writes_no_manifest(sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = OnnxSession.run

    def perturbed(self, array, names=None):
        outputs = original(self, array, names)
        return [outputs[0] + 0.5, *outputs[1:]] if outputs[0].is_floating_point() else outputs

    monkeypatch.setattr(OnnxSession, "run", perturbed)
    out = tmp_path / "bundle"
    with pytest.raises(ParityError, match=r"draft \(onnx, fp32\).*logits"):
        export_draft(sources["draft"], sources["tokenizer"], out, formats=("onnx",))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_legacy_onnx_exporter_fallback_is_recorded(sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = torch.onnx.export

    def dynamo_fails(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated dynamo failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    export_draft(sources["draft"], sources["tokenizer"], tmp_path / "bundle", formats=("onnx",))
    entry = _entry(verify_bundle(tmp_path / "bundle"), "draft", "onnx")
    assert entry["exporter"] == "legacy" and "simulated dynamo failure" in entry["dynamo_error"]
    assert entry["parity"]["token_agreement"] == 1.0


def test_fp16_draft_with_fp32_decoders(sources: dict[str, Path], tmp_path: Path, main_model) -> None:
    report = export_draft(sources["draft"], sources["tokenizer"], tmp_path / "bundle", formats=("torchscript",), precision="fp16")
    manifest = verify_bundle(tmp_path / "bundle")
    draft = _entry(manifest, "draft", "torchscript")
    assert draft["precision"] == "fp16" and draft["parity"]["token_agreement"] >= 0.99
    assert "token_agreement_vs_fp32_eager" in draft["parity"]
    assert _entry(manifest, "decoder_c3", "torchscript")["precision"] == "fp32" and manifest["decoder_precision"] == "fp32"
    assert all(e["built"] for e in report["engines"])
    loaded = load_bundle_engines(tmp_path / "bundle", main_model, engine="torchscript")
    logits, tokens = loaded.draft(torch.randn(3, main_model.hidden_size))
    assert logits.dtype == torch.float16 and tokens.dtype == torch.int64 and top_probability(logits).dtype == torch.float32


def test_fp16_engine_that_cannot_run_is_reported_not_built(sources: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    original = compile_module.EXPORTERS["torchscript"]

    def no_fp16(graph, path, opset, device):
        if graph.precision == "fp16":
            raise RuntimeError(f"no fp16 kernel for {graph.name}")
        return original(graph, path, opset, device)

    def broken(graph, path, opset, device):
        raise RuntimeError(f"broken exporter for {graph.name}")

    monkeypatch.setitem(compile_module.EXPORTERS, "torchscript", no_fp16)
    report = export_draft(sources["draft"], sources["tokenizer"], tmp_path / "bundle", formats=("torchscript",), precision="fp16")
    built = {e["name"]: e["built"] for e in report["engines"]}
    assert built == {"draft": False, "decoder_c3": True, "decoder_c8": True}
    assert "no fp16 kernel" in report["engines"][0]["reason"]
    assert available_engines(tmp_path / "bundle", "cpu") == ["torch"]
    monkeypatch.setitem(compile_module.EXPORTERS, "torchscript", broken)
    with pytest.raises(RuntimeError, match="broken exporter"):
        export_draft(sources["draft"], sources["tokenizer"], tmp_path / "b32", formats=("torchscript",), precision="fp32")


def _write_features(directory: Path, draft_meta_fingerprint: str, tokenizer_dir: Path, episodes: list[int]) -> None:
    """A minimal features folder in the layout `rsd collect-features` writes (random content)."""
    directory.mkdir(parents=True)
    shutil.copytree(tokenizer_dir, directory / "tokenizer")
    frames = 6 * len(episodes)
    gen = torch.Generator().manual_seed(3)
    shard = {
        "exit_hidden": torch.randn(frames, get_preset("tiny").model.llm.hidden_size, generator=gen).half(),
        "main_logits": torch.zeros(frames, 3, 128, 7, dtype=torch.float16),
        "main_tokens": torch.randint(0, 7, (frames, 8, 128), generator=gen),
        "gt_tokens": tokens_to_layers(torch.randint(0, 7, (frames, 8, 16, 8), generator=gen)).contiguous(),
        "episode_id": torch.tensor(episodes, dtype=torch.int64).repeat_interleave(6),
        "frame_index": torch.arange(frames, dtype=torch.int64),
    }
    save_file(shard, str(directory / "shard_00000.safetensors"))
    index = {"kind": "features", "format_version": FORMAT_VERSION, "complete": True, "main_fingerprint": draft_meta_fingerprint,
             "exit_layer": 3, "shards": [{"file": "shard_00000.safetensors", "frames": frames, "first_frame": 0,
                                          "sha256": sha256_file(directory / "shard_00000.safetensors")}]}
    (directory / "index.json").write_text(json.dumps(index))


def test_parity_on_held_out_feature_rows(tmp_path: Path, sources: dict[str, Path]) -> None:
    draft_dir = tmp_path / "draft"
    head, meta = DraftHead.load(sources["draft"])
    head.save(draft_dir, {"main_fingerprint": FINGERPRINT, "val_episodes": [2]})
    _write_features(tmp_path / "features", FINGERPRINT, sources["tokenizer"], episodes=[0, 1, 2])
    report = export_draft(draft_dir, sources["tokenizer"], tmp_path / "bundle", formats=("torchscript",), features=tmp_path / "features")
    assert "held-out episodes" in report["parity_inputs"]["source"] and report["parity_inputs"]["rows"] == 8
    head.save(tmp_path / "draft_unseen", {"main_fingerprint": FINGERPRINT, "val_episodes": [9]})
    with pytest.raises(DataError, match="held-out episodes"):
        export_draft(tmp_path / "draft_unseen", sources["tokenizer"], tmp_path / "b2", formats=("torchscript",),
                     features=tmp_path / "features")


def test_speculative_policy_onnx_matches_torch(bundle: Path, main_model) -> None:
    obs = make_observation()
    chunks = {}
    for engine in ("onnx", "torch"):
        policy = SpeculativePolicy.from_bundle(bundle, main=main_model, engine=engine, tau=0.0)
        chunks[engine] = policy.predict_chunk(obs)
    assert chunks["onnx"].accepted and chunks["torch"].accepted
    assert np.abs(chunks["onnx"].actions - chunks["torch"].actions).max() < 1e-4
    assert np.array_equal(chunks["onnx"].tokens, chunks["torch"].tokens)
