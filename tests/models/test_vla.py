"""PrismaticVLA: exact segmented forward, batching, heads, save/load, presets and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsd.errors import CheckpointError, ConfigError, ShapeError
from rsd.models.heads import RFSQHead
from rsd.models.vla import PrismaticVLA
from rsd.presets import get_preset

INSTRUCTIONS = ["pick up the red block and place it on the plate", "put the blue block next to the green block"]


@pytest.fixture(scope="module")
def vla() -> PrismaticVLA:
    torch.manual_seed(0)
    return PrismaticVLA(get_preset("tiny").model).eval()


def _images(batch: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, 1, size, size, 3), dtype=np.uint8)


def _inputs(vla: PrismaticVLA, batch: int = 2):
    proprio = torch.linspace(-0.5, 0.5, batch * 8).reshape(batch, 8)
    return vla.encode_inputs(_images(batch), INSTRUCTIONS[:batch], proprio)


@torch.inference_mode()
def test_prefix_resume_equals_full_forward_for_every_exit_layer(vla: PrismaticVLA) -> None:
    inputs = _inputs(vla)
    full = vla(inputs)
    for k in range(vla.config.llm.num_layers + 1):
        state = vla.prefix(inputs, k)
        assert state.layer == k and state.query_hidden.shape == (2, vla.config.llm.hidden_size)
        torch.testing.assert_close(vla.resume(state), full, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_exit_hidden_changes_with_layer(vla: PrismaticVLA) -> None:
    inputs = _inputs(vla)
    hiddens = [vla.prefix(inputs, k).query_hidden for k in (1, 3, 5)]
    assert not torch.allclose(hiddens[0], hiddens[1]) and not torch.allclose(hiddens[1], hiddens[2])


@torch.inference_mode()
def test_batch_of_two_equals_two_singles(vla: PrismaticVLA) -> None:
    images = _images(2)
    proprio = torch.tensor([[0.1] * 8, [-0.2] * 8])
    batched = vla(vla.encode_inputs(images, INSTRUCTIONS, proprio))
    for row in range(2):
        single = vla(vla.encode_inputs(images[row : row + 1], INSTRUCTIONS[row : row + 1], proprio[row : row + 1]))
        torch.testing.assert_close(single[0], batched[row], atol=1e-5, rtol=0)


@torch.inference_mode()
def test_state_select_resumes_only_chosen_rows(vla: PrismaticVLA) -> None:
    inputs = _inputs(vla)
    state = vla.prefix(inputs, 2)
    torch.testing.assert_close(vla.resume(state.select(torch.tensor([1]))), vla(inputs)[1:], atol=1e-5, rtol=0)


def test_head_shapes() -> None:
    tok = get_preset("tiny").tokenizer
    head = RFSQHead(128, tok)
    logits = head(torch.randn(3, 128))
    assert logits.shape == (3, tok.num_layers, tok.chunk_len * tok.latent_dim, tok.levels)
    with pytest.raises(ShapeError, match=r"\[B, 128\]"):
        head(torch.randn(3, 64))


@torch.inference_mode()
def test_save_load_round_trip_is_bit_exact(vla: PrismaticVLA, tmp_path) -> None:
    vla.save_pretrained(tmp_path)
    loaded = PrismaticVLA.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(vla.state_dict().items(), loaded.state_dict().items(), strict=False):
        assert torch.equal(a, b), name
    inputs = _inputs(vla)
    assert torch.equal(loaded(inputs), vla(inputs))


def test_load_refuses_missing_or_unexpected_keys(vla: PrismaticVLA, tmp_path) -> None:
    from safetensors.torch import save_file

    from rsd.io import sha256_file

    vla.save_pretrained(tmp_path)
    tensors = {k: v.contiguous() for k, v in vla.state_dict().items() if k != "projector.fc2.weight"}
    tensors["projector.extra"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    manifest = (tmp_path / "model.json").read_text()
    import json

    meta = json.loads(manifest)
    meta["weights_sha256"] = sha256_file(tmp_path / "model.safetensors")
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"projector\.fc2\.weight.*projector\.extra"):
        PrismaticVLA.from_pretrained(tmp_path)


def test_openvla_7b_parameter_count_on_meta_device() -> None:
    with torch.device("meta"):
        model = PrismaticVLA(get_preset("openvla-7b").model)
    total = model.describe()["total"]
    assert abs(total - 7.5e9) / 7.5e9 < 0.02, total
    assert model.vision_backbone.embed_dim == 1152 + 1024 and model.vision_backbone.num_patches == 256


def test_bad_inputs(vla: PrismaticVLA) -> None:
    with pytest.raises(ShapeError, match="64×64"):
        vla.encode_inputs(_images(1, size=32), INSTRUCTIONS[:1], torch.zeros(1, 8))
    with pytest.raises(ShapeError, match="instruction"):
        vla.encode_inputs(_images(1), ["  "], torch.zeros(1, 8))
    with pytest.raises(ShapeError, match="2 instructions"):
        vla.encode_inputs(_images(2), INSTRUCTIONS[:1], torch.zeros(2, 8))
    with pytest.raises(ShapeError, match="proprio"):
        vla.encode_inputs(_images(1), INSTRUCTIONS[:1], torch.zeros(1, 5))
    with pytest.raises(ShapeError, match="images"):
        vla.encode_inputs(np.zeros((1, 64, 64, 3), dtype=np.uint8), INSTRUCTIONS[:1], torch.zeros(1, 8))
    inputs = _inputs(vla, 1)
    for bad in (-1, 7):
        with pytest.raises(ConfigError, match="exit_layer"):
            vla.prefix(inputs, bad)
    with pytest.raises(ConfigError, match="exit_layer"):
        vla.advance(vla.prefix(inputs, 4), 2)


def test_resize_when_configured() -> None:
    import dataclasses

    config = dataclasses.replace(get_preset("tiny").model, resize_images=True)
    model = PrismaticVLA(config).eval()
    inputs = model.encode_inputs(_images(1, size=96), INSTRUCTIONS[:1], torch.zeros(1, 8))
    assert inputs.pixel_values.shape == (1, 1, 3, 64, 64)


def test_random_weights_and_inputs_run_without_a_text_tokenizer() -> None:
    config = get_preset("tiny").model
    model = PrismaticVLA.random(config, seed=1)
    inputs = model.random_inputs(batch=2, prompt_len=10)
    with torch.inference_mode():
        assert model(inputs).shape == (2, config.llm.hidden_size)


def test_word_tokenizer_has_no_collisions_on_the_tabletop_instructions() -> None:
    from rsd.envs.tabletop import PALETTE, TEMPLATES
    from rsd.models.text import WordTokenizer

    config = get_preset("tiny").model
    tokenizer = WordTokenizer(config.llm.vocab_size)
    texts = [config.prompt_template.format(instruction=t.format(a, b)) for t in TEMPLATES.values() for a in PALETTE for b in PALETTE]
    assert tokenizer.collisions(texts) == {}
    assert len(tokenizer.encode(texts[0])) < 30
