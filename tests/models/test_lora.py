"""LoRA fine-tuning with CogVLA's modules: what peft adapts and what trains, and the three-part checkpoint's round trip and refusals."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import two_vit_config
from safetensors.torch import load_file, save_file

from rsd.config import AdapterConfig, CogVLAConfig
from rsd.data.stats import ActionStats, DatasetStatistics
from rsd.errors import CheckpointError
from rsd.io import save_artifact
from rsd.models.heads import RFSQHead
from rsd.models.lora import LoRAMainModel, load_lora_checkpoint, part_of
from rsd.models.main import MainModel
from rsd.models.vla import PrismaticVLA
from rsd.tokenizer import ActionTokenizer

INSTRUCTIONS = ["pick up the red block", "put the blue block next to the green block on the left"]
ALL = CogVLAConfig(aggregation_tokens=8, film=True, moe=True, lfp_layers=(1, 3), action_tokens=4)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A saved two-ViT tiny policy with seeded random weights: the model LoRA fine-tunes."""
    torch.manual_seed(0)
    config = two_vit_config()
    rng = np.random.default_rng(0)
    stats = DatasetStatistics(action=ActionStats.from_actions(rng.uniform(-1, 1, (256, 7))),
                              proprio=ActionStats.from_actions(rng.uniform(-0.5, 0.5, (256, 8))))
    main = MainModel(PrismaticVLA(config), RFSQHead(config.llm.hidden_size, config.tokenizer), ActionTokenizer(config.tokenizer, stats.action), stats, "test")
    folder = tmp_path_factory.mktemp("base") / "policy"
    main.save(folder)
    return folder


def fine_tuned(base) -> LoRAMainModel:
    """The base with every CogVLA module and rank-4 adapters, its trainable weights moved as training would."""
    source = MainModel.load(base)
    main = LoRAMainModel.from_base(base, ALL, AdapterConfig(rank=4, alpha=8.0), source.tokenizer, source.statistics, "test")
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in main.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return main.eval()


def observation(main: MainModel):
    images = np.random.default_rng(3).integers(0, 256, size=(2, 1, 64, 64, 3), dtype=np.uint8)
    return main.prepare(images, INSTRUCTIONS, np.zeros((2, 8), dtype=np.float32))


def test_adapters_sit_on_every_llm_linear_and_only_the_recipe_trains(base) -> None:
    main = fine_tuned(base)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in main.named_parameters() if ".lora_A." in name}
    layers = main.vla.config.llm.num_layers
    proj = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    assert adapted == {f"vla.language_model.model.layers.{i}.{proj.get(n, 'mlp')}.{n}" for i in range(layers) for n in LINEARS}
    trains = {name for name, p in main.named_parameters() if p.requires_grad}
    assert not any(n.startswith("vla.vision_backbone.") or n.startswith("tokenizer.") for n in trains)  # vision frozen
    assert not any(n.startswith("vla.language_model.") and ".lora_" not in n for n in trains)  # LLM only through adapters
    for new in ("vla.cogvla.vision.aggregation.0", "vla.cogvla.vision.film.1.0.weight", "vla.cogvla.moe.router_in.weight",
                "vla.cogvla.lfp.3.down.weight", "vla.cogvla.action_offsets", "vla.query_summary.weight", "head.output.weight"):
        assert new in trains, new
    assert {part_of(n) for n in trains} == {"adapter", "vision", "trainables"}


@torch.inference_mode()
def test_checkpoint_round_trip_restores_every_part_with_the_adapters_merged(base, tmp_path) -> None:
    main = fine_tuned(base)
    x = observation(main)
    expected = main.head(main.vla(x))
    main.save(tmp_path / "policy")
    assert sorted(p.name for p in (tmp_path / "policy" / "lora").glob("*.safetensors")) == [
        "lora_adapter.safetensors", "non_lora_trainables.safetensors", "vision_backbone.safetensors"]
    loaded = load_lora_checkpoint(tmp_path / "policy" / "lora")
    assert not any(".lora_" in name for name in loaded.state_dict())  # merged: plain linear layers
    torch.testing.assert_close(loaded.head(loaded.vla(x)), expected, atol=1e-5, rtol=0)
    # the trainables came from the checkpoint, not from the base or a fresh init (the seed's "unmerged trainables")
    for key in ("cogvla.moe.router_in.weight", "cogvla.lfp.1.score.weight", "cogvla.vision.aggregation.1"):
        torch.testing.assert_close(loaded.vla.state_dict()[key], main.vla.state_dict()[key], atol=0, rtol=0)
    policy = MainModel.load(tmp_path / "policy")  # the merged policy folder the runtime reads
    torch.testing.assert_close(policy.head(policy.vla(x)), expected, atol=1e-5, rtol=0)
    assert policy.fingerprint == main.fingerprint


@pytest.mark.parametrize("part", ["lora_adapter", "vision_backbone", "non_lora_trainables"])
def test_a_checkpoint_missing_a_part_is_refused_naming_it(base, tmp_path, part) -> None:
    main = fine_tuned(base)
    main.save(tmp_path / "policy")
    (tmp_path / "policy" / "lora" / f"{part}.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"{part}.safetensors"):
        load_lora_checkpoint(tmp_path / "policy" / "lora")


def test_parts_that_miss_keys_a_non_finite_router_or_another_base_are_refused(base, tmp_path) -> None:
    main = fine_tuned(base)
    main.save(tmp_path / "ok")
    folder = tmp_path / "keys"
    shutil.copytree(tmp_path / "ok", folder)
    tensors = load_file(folder / "lora" / "non_lora_trainables.safetensors")
    del tensors["vla.cogvla.lfp.3.score.weight"]
    save_file(tensors, folder / "lora" / "non_lora_trainables.safetensors")
    with pytest.raises(CheckpointError, match="sha256"):  # the part's manifest catches an edited file
        load_lora_checkpoint(folder / "lora")
    save_artifact(folder / "lora", "non_lora_trainables", tensors, {}, kind="non_lora_trainables")  # consistent, but a key short
    with pytest.raises(CheckpointError, match=r"trainables part does not match.*lfp\.3\.score\.weight"):
        load_lora_checkpoint(folder / "lora")
    with torch.no_grad():
        main.vla.cogvla.moe.router_out.weight[0, 0] = float("nan")
    main.save(tmp_path / "nan")
    with pytest.raises(CheckpointError, match=r"router_out\.weight.*NaN or inf"):
        load_lora_checkpoint(tmp_path / "nan" / "lora")
    other = tmp_path / "other_base"
    source = MainModel.load(base)
    torch.manual_seed(5)
    MainModel(PrismaticVLA(source.vla.config), RFSQHead(source.vla.config.llm.hidden_size, source.vla.config.tokenizer), source.tokenizer, source.statistics,
              "test").save(other)
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_lora_checkpoint(tmp_path / "ok" / "lora", base=other)


def test_fine_tuning_refuses_a_tokenizer_other_than_the_bases(base) -> None:
    source = MainModel.load(base)
    torch.manual_seed(9)
    other = ActionTokenizer(source.tokenizer.config, source.statistics.action)  # same shape, other weights
    with pytest.raises(CheckpointError, match="tokenizer differs"):
        LoRAMainModel.from_base(base, ALL, AdapterConfig(rank=4), other, source.statistics, "test")
