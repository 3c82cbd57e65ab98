"""DraftHead: shapes, argmax tokens, and the load-time checks that keep a random projection out of the runtime."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from rsd.errors import CheckpointError, ShapeError
from rsd.io import sha256_file
from rsd.models.draft import DraftHead
from rsd.presets import get_preset


@pytest.fixture()
def config():
    return get_preset("tiny").draft(3)


def test_shapes_and_tokens(config):
    draft = DraftHead(config).eval()
    out = draft(torch.randn(5, config.hidden_size))
    tok = config.tokenizer
    assert out.logits.shape == (5, tok.coarse_layers, tok.tokens_per_layer, tok.levels)
    assert out.tokens.shape == (5, tok.coarse_layers, tok.tokens_per_layer)
    assert torch.equal(out.tokens, out.logits.argmax(-1))
    with pytest.raises(ShapeError, match=rf"expected exit hidden \[B, {config.hidden_size}\]"):
        draft(torch.randn(2, config.hidden_size + 1))


def test_openvla_sized_draft_parameter_count():
    draft_config = get_preset("openvla-7b").draft()
    with torch.device("meta"):
        draft = DraftHead(draft_config)
    assert draft.input_projection.weight.shape == (512, 4096)
    assert 6.0e6 < draft.num_parameters() < 7.5e6


def test_save_load_round_trip(tmp_path, config):
    draft = DraftHead(config).eval()
    draft.save(tmp_path, {"main_fingerprint": "abc"})
    loaded, meta = DraftHead.load(tmp_path, expect_hidden=config.hidden_size, expect_exit_layer=3, expect_fingerprint="abc")
    x = torch.randn(3, config.hidden_size)
    assert torch.equal(loaded(x).logits, draft(x).logits)
    assert meta["main_fingerprint"] == "abc"


def _rewrite_without(tmp_path, prefix):
    """Drop keys starting with `prefix` from a saved draft and fix the recorded hash (a tampered checkpoint)."""
    path = tmp_path / "draft.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith(prefix)}
    save_file(tensors, str(path))
    manifest = (tmp_path / "draft.json").read_text()
    import json

    data = json.loads(manifest)
    data["weights_sha256"] = sha256_file(path)
    (tmp_path / "draft.json").write_text(json.dumps(data))


def test_missing_projection_is_refused(tmp_path, config):
    DraftHead(config).save(tmp_path, {"main_fingerprint": "abc"})
    _rewrite_without(tmp_path, "input_projection.")
    with pytest.raises(CheckpointError, match="input_projection"):
        DraftHead.load(tmp_path)


def test_other_hidden_size_exit_layer_or_main_refused(tmp_path, config):
    DraftHead(config).save(tmp_path, {"main_fingerprint": "abc"})
    with pytest.raises(CheckpointError, match=f"hidden size {config.hidden_size}.*has 256"):
        DraftHead.load(tmp_path, expect_hidden=256)
    with pytest.raises(CheckpointError, match="exit layer 3.*has 2"):
        DraftHead.load(tmp_path, expect_exit_layer=2)
    with pytest.raises(CheckpointError, match="fingerprint"):
        DraftHead.load(tmp_path, expect_fingerprint="other")


def test_missing_other_key_is_refused(tmp_path, config):
    DraftHead(dataclasses.replace(config)).save(tmp_path, {"main_fingerprint": "abc"})
    _rewrite_without(tmp_path, "layer_heads.2")
    with pytest.raises(CheckpointError, match="layer_heads.2"):
        DraftHead.load(tmp_path)
