"""OpenVLA's action mode: the 256-bin tokenizer against OpenVLA's own formulas, teacher forcing against KV-cached decoding,
an original OpenVLA folder decoding as OpenVLA's predict_action does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from decoding_fixtures import scrambled_action_draft, tiny_ar_model

from rsd.errors import CheckpointError, ConfigError, ShapeError
from rsd.models.ar_actions import ARActionModel, BinActionTokenizer, BinTokenizerConfig
from rsd.models.vla import PrismaticVLA
from rsd.presets import get_preset
from rsd.runtime.ar_policy import ARActionPolicy, action_target

INSTRUCTIONS = ["pick up the red block and place it on the plate", "put the red block next to the blue block"]


def openvla_reference(actions: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenVLA's ActionTokenizer (prismatic/vla/action_tokenizer.py) and predict_action's decoding, written out."""
    bins = np.linspace(-1, 1, 256)
    bin_centers = (bins[:-1] + bins[1:]) / 2.0
    ids = vocab_size - np.digitize(np.clip(actions, a_min=-1.0, a_max=1.0), bins)
    discretized = vocab_size - ids
    discretized = np.clip(discretized - 1, a_min=0, a_max=bin_centers.shape[0] - 1)
    return ids, bin_centers[discretized]


def test_bin_tokenizer_is_openvlas() -> None:
    tokenizer = BinActionTokenizer(BinTokenizerConfig(vocab_size=32000))
    actions = np.concatenate([np.random.default_rng(0).uniform(-1.2, 1.2, size=(300, 7)), [[-1, 1, 0, -0.999, 0.999, 1e-9, -1e-9]]])
    ids, decoded = openvla_reference(actions, 32000)
    np.testing.assert_array_equal(tokenizer.encode(actions), ids)
    np.testing.assert_array_equal(tokenizer.decode(ids), decoded)
    assert tokenizer.encode(np.array([-1.0, 1.0])).tolist() == [31999, 31744]  # the last 256 ids of Llama-2's 32000
    local = tokenizer.to_local(ids)
    assert local.min() >= 0 and local.max() <= 255
    np.testing.assert_array_equal(tokenizer.from_local(local), ids)
    inside = np.abs(actions) <= 1.0
    assert np.abs(tokenizer.decode(ids) - actions)[inside].max() <= 2.0 / 255 + 1e-12  # within one bin width
    with pytest.raises(ShapeError):
        tokenizer.to_local(np.array([31743]))
    with pytest.raises(ConfigError):
        BinTokenizerConfig(vocab_size=100)


@torch.no_grad()
def test_teacher_forcing_equals_kv_cached_decoding_with_padded_prompts() -> None:
    model = tiny_ar_model()
    images = np.random.default_rng(1).integers(0, 256, size=(2, 1, 64, 64, 3), dtype=np.uint8)
    inputs = model.vla.encode_inputs(images, INSTRUCTIONS)
    assert not bool(inputs.text_mask.all())  # the rows have different prompt lengths: the shorter is right-padded
    tokens = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    batched = model.teacher_forced_logits(inputs, tokens)
    target = action_target(model)
    for row in range(2):
        prefix = model.prefix(model.vla.encode_inputs(images[row : row + 1], INSTRUCTIONS[row : row + 1]))
        patches = model.vla.vision_backbone.num_patches
        assert prefix.shape[1] == 1 + patches + int(inputs.text_mask[row].sum())  # BOS, the visual tokens, prompt with its end id
        cache = target.new_cache()
        first = target.prefill(prefix, cache)
        cached = torch.cat([first.unsqueeze(1), target.forward(tokens[row : row + 1, :6], cache)], dim=1)
        torch.testing.assert_close(cached[0], batched[row], rtol=0, atol=1e-10)


def test_actions_are_unnormalised_bin_centres() -> None:
    model = tiny_ar_model()
    local = np.array([0, 255, 128, 127, 10, 200, 64])
    normalized = model.tokenizer.decode(model.tokenizer.from_local(local))
    low, high = np.array(model.statistics.action.q01), np.array(model.statistics.action.q99)
    np.testing.assert_allclose(model.actions(local), 0.5 * (normalized + 1.0) * (high - low) + low, rtol=0, atol=1e-5)
    assert normalized[0] > 0.99 and normalized[1] < -0.99  # local 0 is the highest bin, 255 the lowest (OpenVLA's reversed ids)


def test_save_load_round_trip_and_checks(tmp_path: Path) -> None:
    model = tiny_ar_model(dtype=torch.float32)
    fingerprint = model.save(tmp_path / "policy")
    loaded = ARActionModel.load(tmp_path / "policy")
    assert loaded.fingerprint == fingerprint and loaded.tokenizer.config == model.tokenizer.config
    for key, value in model.vla.state_dict().items():
        torch.testing.assert_close(loaded.vla.state_dict()[key], value)
    (tmp_path / "policy" / "dataset_statistics.json").write_text((tmp_path / "policy" / "dataset_statistics.json").read_text().replace("1", "2", 1))
    with pytest.raises(CheckpointError):
        ARActionModel.load(tmp_path / "policy")
    with pytest.raises(ConfigError):
        ARActionModel(PrismaticVLA(get_preset("tiny").model), model.tokenizer, model.statistics, "test")  # rsd layout, not OpenVLA's
    with pytest.raises(ShapeError):
        model.prefix(model.vla.encode_inputs(np.zeros((2, 1, 64, 64, 3), dtype=np.uint8), INSTRUCTIONS))


@pytest.fixture(scope="module")
def openvla_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A small random checkpoint in OpenVLA's exact folder layout and the reference modules it was written from."""
    from test_openvla import Reference, _write_folder

    reference = Reference()
    folder = tmp_path_factory.mktemp("openvla_ar")
    _write_folder(folder, reference, oft=False)
    return folder, reference


def test_original_openvla_folder_decodes_as_openvla(openvla_checkpoint: tuple[Path, object]) -> None:
    from test_openvla import TINY_VISION, _embed

    folder, reference = openvla_checkpoint
    model = ARActionModel.from_openvla(folder, "bridge_orig", device="cpu", dtype=torch.float32, vision_overrides=TINY_VISION)
    assert model.tokenizer.config.token_offset == 32000 - 256
    images = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    obs = {"image": images, "instruction": "pick up the red block"}
    tokens = ARActionPolicy(model).predict_tokens(obs)
    speculative = ARActionPolicy(model, scrambled_action_draft(model, layers=(1,)), gamma=3)
    np.testing.assert_array_equal(speculative.predict_tokens(obs), tokens)
    # OpenVLA's predict_action by hand: greedy over the LM on [BOS, patches, prompt, 29871], recomputed without a cache,
    # the argmax taken over the action ids (rsd's head slice)
    inputs = model.vla.encode_inputs(images[None, None], ["pick up the red block"])
    prompt = inputs.input_ids[0].tolist()
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(7):
            embeddings = _embed(reference, prompt + generated, reference.patches(inputs.pixel_values), [], [])
            logits = reference.llm(inputs_embeds=embeddings).logits[0, -1]
            generated.append(31744 + int(logits[31744:32000].argmax()))
    np.testing.assert_array_equal(tokens + 31744, generated)
    _, normalized = openvla_reference_decode(np.asarray(generated))
    stats = model.statistics.action
    low, high, mask = np.array(stats.q01), np.array(stats.q99), np.array(stats.mask)
    expected = np.where(mask, 0.5 * (normalized + 1) * (high - low) + low, normalized)  # OpenVLA's un-normalisation
    np.testing.assert_allclose(model.actions(tokens), expected, rtol=0, atol=1e-5)


def openvla_reference_decode(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenVLA's predict_action decoding of action ids: (bin index, normalised action)."""
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2.0
    index = np.clip(32000 - ids - 1, a_min=0, a_max=centers.shape[0] - 1)
    return index, centers[index]
