"""Loading OpenVLA / OpenVLA-OFT folders: key mapping, layouts, OFT's mask and shift, L1 head, inspect-main.

No real weights: each test writes a small random checkpoint in OpenVLA's exact key layout and file format
(two timm ViTs of OpenVLA's architectures shrunk by overrides, a fused projector, a transformers Llama; safetensors
shards + `model.safetensors.index.json` + `config.json` + `dataset_statistics.json` + a tokenizer), built from
those libraries' own modules, not from PrismaticVLA. References are computed from the same modules directly:
timm blocks up to the second-to-last, the projector by hand, transformers' Llama on the assembled embeddings with
an explicit 4D mask (eager attention, where rsd uses SDPA).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from rsd.cli import main
from rsd.config import VLAConfig
from rsd.errors import CheckpointError, ConfigError
from rsd.models.oft_heads import L1RegressionActionHead, load_l1_head, oft_predict_actions
from rsd.models.openvla import load_openvla, openvla_config, openvla_key_to_rsd
from rsd.models.vla import PrismaticVLA
from rsd.presets import get_preset

DINO, SIGLIP = "vit_large_patch14_reg4_dinov2", "vit_so400m_patch14_siglip_224"
TINY_VISION = [dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2), dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=2)]
TEXT_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 4, "vocab_size": 32064, "pad_token_id": 32000}
HIDDEN, PATCHES, PROPRIO = 64, 16, 8
INSTRUCTIONS = ["pick up the red block", "put the blue block on the plate now"]
WORDS = ["In", ":", "What", "action", "should", "the", "robot", "take", "to", "?", "Out", "pick", "up", "red", "block", "put",
         "blue", "on", "plate", "now"]


def _hf_config() -> dict:
    stats = {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}}
    return {"model_type": "openvla", "architectures": ["OpenVLAForActionPrediction"], "vision_backbone_id": "dinosiglip-vit-so-224px",
            "llm_backbone_id": "llama2-7b-pure", "arch_specifier": "no-align+fused-gelu-mlp", "use_fused_vision_backbone": True,
            "image_resize_strategy": "resize-naive", "timm_model_ids": [f"{DINO}.lvd142m", SIGLIP], "image_sizes": [224, 224],
            "timm_override_act_layers": [None, None], "text_config": TEXT_CONFIG, "n_action_bins": 256, "pad_to_multiple_of": 64,
            "pad_token_id": 32000, "norm_stats": {"bridge_orig": stats}}


class Reference(nn.Module):
    """OpenVLA's parts as its own libraries build them (timm, nn.Linear, transformers), with random weights."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.dino = timm.create_model(DINO, pretrained=False, num_classes=0, **TINY_VISION[0])
        self.siglip = timm.create_model(SIGLIP, pretrained=False, num_classes=0, **TINY_VISION[1])
        self.fc1, self.fc2, self.fc3 = nn.Linear(80, 320), nn.Linear(320, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.llm = LlamaForCausalLM(LlamaConfig(**TEXT_CONFIG, attn_implementation="eager"))
        self.proprio_fc1, self.proprio_fc2 = nn.Linear(PROPRIO, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                parameter.normal_(0.0, 0.05)
                if parameter.ndim == 1 and ("norm" in name or name.endswith("gamma")):
                    parameter.add_(1.0)
        self.eval()

    def checkpoint(self) -> dict[str, torch.Tensor]:
        """The tensors under OpenVLA's HF keys (LayerScale stored as `scale_factor`, as its HF port renames it)."""
        tensors = {}
        for prefix, vit in (("vision_backbone.featurizer.", self.dino), ("vision_backbone.fused_featurizer.", self.siglip)):
            for key, value in vit.state_dict().items():
                tensors[prefix + re.sub(r"\.(ls[12])\.gamma$", r".\1.scale_factor", key)] = value
        for name in ("fc1", "fc2", "fc3"):
            for kind in ("weight", "bias"):
                tensors[f"projector.{name}.{kind}"] = getattr(getattr(self, name), kind)
        tensors.update({f"language_model.{k}": v for k, v in self.llm.state_dict().items()})
        return {k: v.detach().clone().contiguous() for k, v in tensors.items()}

    def proprio_state(self) -> dict[str, torch.Tensor]:
        """OFT's proprio projector file content (DDP `module.` prefix, as OFT saves it)."""
        return {f"module.{name}.{kind}": getattr(getattr(self, f"proprio_{name}"), kind).detach().clone()
                for name in ("fc1", "fc2") for kind in ("weight", "bias")}

    def patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected patches `[B, N*P, D]`: each ViT's second-to-last block output, prefix tokens dropped."""
        batch, cams = pixel_values.shape[:2]
        images = pixel_values.flatten(0, 1)
        features = []
        for index, vit in enumerate((self.dino, self.siglip)):
            x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images[:, 3 * index : 3 * index + 3])))
            for block in vit.blocks[: len(vit.blocks) - 1]:
                x = block(x)
            features.append(x[:, vit.num_prefix_tokens :])
        projected = self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(torch.cat(features, dim=-1))))))
        return projected.reshape(batch, cams * PATCHES, HIDDEN)

    def last_hidden(self, embeddings: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """transformers' LlamaModel on `[1, S, D]` embeddings with the bool pattern `allowed [S, S]`; final-norm hidden."""
        mask = torch.zeros(1, 1, *allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        return self.llm.model(inputs_embeds=embeddings, attention_mask=mask).last_hidden_state


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {w: 3 + i for i, w in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(str(folder))


def _write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Two shards (vision + projector, language model) and the index, as HF's sharded save writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("model-*.safetensors"):
        old.unlink()
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if not k.startswith("language_model.")},
              "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if k.startswith("language_model.")}}
    weight_map = {}
    for name, part in shards.items():
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def _write_folder(folder: Path, reference: Reference, oft: bool) -> None:
    _write_checkpoint(folder, reference.checkpoint())
    (folder / "config.json").write_text(json.dumps(_hf_config()))
    _write_tokenizer(folder)
    if oft:
        stats = {"action": {"q01": [-0.5] * 7, "q99": [0.5] * 7}, "proprio": {"q01": [-1.0] * 8, "q99": [1.0] * 8}}
        (folder / "dataset_statistics.json").write_text(json.dumps({"libero_spatial_no_noops": stats}))
        torch.save(reference.proprio_state(), folder / "proprio_projector--150000_checkpoint.pt")


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def openvla_folder(tmp_path_factory, reference: Reference) -> Path:
    folder = tmp_path_factory.mktemp("openvla")
    _write_folder(folder, reference, oft=False)
    return folder


@pytest.fixture(scope="module")
def oft_folder(tmp_path_factory, reference: Reference) -> Path:
    folder = tmp_path_factory.mktemp("oft")
    _write_folder(folder, reference, oft=True)
    return folder


def _images(batch: int, cams: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, cams, 32, 32, 3), dtype=np.uint8)


def _load(folder: Path, variant: str, **options) -> PrismaticVLA:
    return load_openvla(folder, variant=variant, device="cpu", dtype=torch.float32, vision_overrides=TINY_VISION, **options)


def _embed(reference: Reference, ids: list[int], patches: torch.Tensor, middle: list[torch.Tensor], tail: list[torch.Tensor]) -> torch.Tensor:
    table = reference.llm.model.embed_tokens
    return torch.cat([table(torch.tensor([[1]])), patches, *middle, table(torch.tensor([ids])), *tail], dim=1)


def test_every_key_is_consumed_and_values_are_the_files(openvla_folder: Path, reference: Reference) -> None:
    vla = _load(openvla_folder, "openvla")
    loaded = vla.state_dict()
    stored = {openvla_key_to_rsd(k): v for k, v in reference.checkpoint().items()}
    assert set(loaded) == set(stored) and "action_query" not in loaded
    for key, value in stored.items():
        assert torch.equal(loaded[key], value), key


@torch.inference_mode()
def test_openvla_layout_matches_llama_run_directly(openvla_folder: Path, reference: Reference) -> None:
    vla = _load(openvla_folder, "openvla")
    inputs = vla.encode_inputs(_images(2), INSTRUCTIONS)
    full = vla(inputs)
    for k in range(vla.config.llm.num_layers + 1):
        torch.testing.assert_close(vla.resume(vla.prefix(inputs, k)), full, atol=1e-5, rtol=0)
    for row in range(2):
        ids = inputs.input_ids[row][inputs.text_mask[row]].tolist()
        assert ids[-1] == 29871  # OpenVLA's appended empty token
        embeddings = _embed(reference, ids, reference.patches(inputs.pixel_values[row : row + 1]), [], [])
        length = embeddings.shape[1]
        expected = reference.last_hidden(embeddings, torch.ones(length, length, dtype=torch.bool).tril())[:, -1]
        torch.testing.assert_close(full[row : row + 1], expected, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
@pytest.mark.parametrize("attention", ["full", "action_block"])
def test_oft_layout_mask_and_shift_match_hand_built_reference(oft_folder: Path, reference: Reference, attention: str) -> None:
    vla = _load(oft_folder, "oft", num_images=2, use_proprio=True, oft_attention=attention)
    proprio = torch.linspace(-0.5, 0.5, 2 * PROPRIO).reshape(2, PROPRIO)
    inputs = vla.encode_inputs(_images(2, cams=2), INSTRUCTIONS, proprio)
    state = vla.embed(inputs)
    actions = vla.action_hidden(state)
    assert actions.shape == (2, 56, HIDDEN) and state.query_hidden.shape == (2, HIDDEN)
    torch.testing.assert_close(vla(inputs), actions.mean(dim=1), atol=1e-6, rtol=0)
    for k in range(vla.config.llm.num_layers + 1):
        torch.testing.assert_close(vla.resume(vla.prefix(inputs, k)), vla(inputs), atol=1e-5, rtol=0)
    for row in range(2):
        ids = inputs.input_ids[row][inputs.text_mask[row]].tolist()
        proprio_token = reference.proprio_fc2(F.gelu(reference.proprio_fc1(proprio[row : row + 1]))).unsqueeze(1)
        stop = reference.llm.model.embed_tokens(torch.tensor([[2]]))
        embeddings = _embed(reference, ids, reference.patches(inputs.pixel_values[row : row + 1]), [proprio_token],
                            [torch.zeros(1, 56, HIDDEN), stop])
        length = embeddings.shape[1]
        prompt_len = 1 + len(ids)  # BOS + prompt (with 29871)
        start = 1 + 2 * PATCHES + 1 + len(ids)  # first placeholder
        if attention == "full":
            allowed = torch.ones(length, length, dtype=torch.bool)
        else:
            allowed = torch.ones(length, length, dtype=torch.bool).tril()
            allowed[start : start + 56, start : start + 56] = True
        last = reference.last_hidden(embeddings, allowed)
        p = 2 * PATCHES + 1 + prompt_len - 1  # OFT's shift: P = num_patches (+1 proprio) + prompt_len - 1
        torch.testing.assert_close(actions[row : row + 1], last[:, p : p + 56], atol=1e-4, rtol=1e-4)


def _head_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """OFT's L1 head keys for hidden 64, 7 dims, 2 blocks, as its `torch.save(state_dict)` writes them under DDP."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"model.layer_norm1.weight": (7 * HIDDEN,), "model.layer_norm1.bias": (7 * HIDDEN,), "model.fc1.weight": (HIDDEN, 7 * HIDDEN),
              "model.fc1.bias": (HIDDEN,), "model.layer_norm2.weight": (HIDDEN,), "model.layer_norm2.bias": (HIDDEN,),
              "model.fc2.weight": (7, HIDDEN), "model.fc2.bias": (7,)}
    for block in range(2):
        shapes |= {f"model.mlp_resnet_blocks.{block}.ffn.0.weight": (HIDDEN,), f"model.mlp_resnet_blocks.{block}.ffn.0.bias": (HIDDEN,),
                   f"model.mlp_resnet_blocks.{block}.ffn.1.weight": (HIDDEN, HIDDEN), f"model.mlp_resnet_blocks.{block}.ffn.1.bias": (HIDDEN,)}
    return {f"module.{k}": torch.randn(shape, generator=generator) * 0.1 for k, shape in shapes.items()}


def _head_by_hand(state: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    w = {k.removeprefix("module.model."): v for k, v in state.items()}
    x = hidden.reshape(hidden.shape[0], 8, 7 * HIDDEN)
    x = F.relu(F.linear(F.layer_norm(x, (7 * HIDDEN,), w["layer_norm1.weight"], w["layer_norm1.bias"]), w["fc1.weight"], w["fc1.bias"]))
    for b in range(2):
        y = F.layer_norm(x, (HIDDEN,), w[f"mlp_resnet_blocks.{b}.ffn.0.weight"], w[f"mlp_resnet_blocks.{b}.ffn.0.bias"])
        x = x + F.relu(F.linear(y, w[f"mlp_resnet_blocks.{b}.ffn.1.weight"], w[f"mlp_resnet_blocks.{b}.ffn.1.bias"]))
    x = F.layer_norm(x, (HIDDEN,), w["layer_norm2.weight"], w["layer_norm2.bias"])
    return F.linear(x, w["fc2.weight"], w["fc2.bias"])


@torch.inference_mode()
def test_l1_head_loads_from_pt_and_reproduces_oft_actions(oft_folder: Path, tmp_path: Path) -> None:
    state = _head_state()
    torch.save(state, oft_folder / "action_head--150000_checkpoint.pt")
    head = load_l1_head(oft_folder, hidden_size=HIDDEN)
    hidden = torch.randn(3, 56, HIDDEN)
    assert head(hidden).shape == (3, 8, 7)
    torch.testing.assert_close(head(hidden), _head_by_hand(state, hidden), atol=1e-5, rtol=1e-5)
    vla = _load(oft_folder, "oft", num_images=2, use_proprio=True)
    inputs = vla.encode_inputs(_images(2, cams=2), INSTRUCTIONS, torch.zeros(2, PROPRIO))
    actions = oft_predict_actions(vla, head, inputs)
    assert actions.shape == (2, 8, 7)
    torch.testing.assert_close(actions, _head_by_hand(state, vla.action_hidden(vla.embed(inputs))), atol=1e-5, rtol=1e-5)
    broken = {k: v for k, v in state.items() if not k.endswith("fc2.bias")}
    torch.save(broken, tmp_path / "action_head--1_checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"model\.fc2\.bias"):
        load_l1_head(tmp_path / "action_head--1_checkpoint.pt", hidden_size=HIDDEN)


def test_removed_or_renamed_key_is_refused_by_name(tmp_path: Path, reference: Reference) -> None:
    folder = tmp_path / "ckpt"
    _write_folder(folder, reference, oft=False)
    tensors = reference.checkpoint()
    _write_checkpoint(folder, {k: v for k, v in tensors.items() if k != "projector.fc2.bias"})
    with pytest.raises(CheckpointError, match=r"missing keys \['projector\.fc2\.bias'\], unexpected keys \[\]"):
        _load(folder, "openvla")
    renamed = dict(tensors)
    renamed["vision_backbone.fused_featurizer.blocks.0.attn.qkv.weights"] = renamed.pop("vision_backbone.fused_featurizer.blocks.0.attn.qkv.weight")
    _write_checkpoint(folder, renamed)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.weight'\].*blocks\.0\.attn\.qkv\.weights'\]"):
        _load(folder, "openvla")
    _write_checkpoint(folder, tensors | {"language_model.lm_head.weight": torch.zeros(10, HIDDEN)})
    with pytest.raises(CheckpointError, match=r"lm_head\.weight' expected shape \(32064, 64\), got \(10, 64\)"):
        _load(folder, "openvla")


def _openvla_7b_keys() -> dict[str, tuple[int, ...]]:
    """The key → shape list of an OpenVLA-7B checkpoint, generated from the timm and transformers modules it uses."""
    keys: dict[str, tuple[int, ...]] = {}
    with torch.device("meta"):
        for prefix, name in (("vision_backbone.featurizer.", f"{DINO}.lvd142m"), ("vision_backbone.fused_featurizer.", SIGLIP)):
            vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=224)
            for key, value in vit.state_dict().items():
                keys[prefix + re.sub(r"\.(ls[12])\.gamma$", r".\1.scale_factor", key)] = tuple(value.shape)
        for name, shape in (("fc1", (8704, 2176)), ("fc2", (4096, 8704)), ("fc3", (4096, 4096))):
            keys[f"projector.{name}.weight"], keys[f"projector.{name}.bias"] = shape, shape[:1]
        llm = LlamaForCausalLM(LlamaConfig(model_type="llama", pad_token_id=32000, vocab_size=32064))
        keys.update({f"language_model.{k}": tuple(v.shape) for k, v in llm.state_dict().items()})
    return keys


def test_openvla_7b_preset_has_the_openvla_7b_key_layout(tmp_path: Path) -> None:
    expected = {openvla_key_to_rsd(k): v for k, v in _openvla_7b_keys().items()}
    assert sum(k.endswith(".ls1.gamma") for k in expected) == 24  # DINOv2-L's LayerScale, stored as scale_factor
    preset = get_preset("openvla-7b").model
    with torch.device("meta"):
        openvla = {k: tuple(v.shape) for k, v in PrismaticVLA(dataclasses.replace(preset, layout="openvla")).state_dict().items()}
        rsd = {k: tuple(v.shape) for k, v in PrismaticVLA(preset).state_dict().items()}
    assert openvla == expected
    assert rsd == expected | {"action_query": (4096,)}
    (tmp_path / "config.json").write_text(json.dumps(_hf_config() | {"text_config": {"model_type": "llama", "pad_token_id": 32000,
                                                                                      "vocab_size": 32064}}))
    config = openvla_config(tmp_path, "openvla")
    assert config.llm == preset.llm
    assert [(v.timm_name, v.img_size, v.mean, v.std, v.feature_layer) for v in config.vision] == \
        [(v.timm_name, v.img_size, v.mean, v.std, v.feature_layer) for v in preset.vision]


def test_inspect_main_reports_variant_dims_dtype_and_statistics(oft_folder: Path, openvla_folder: Path, tmp_path: Path) -> None:
    from conftest import make_tiny_main

    torch.save(_head_state(), oft_folder / "action_head--150000_checkpoint.pt")
    runner = CliRunner()
    oft = json.loads(runner.invoke(main, ["inspect-main", str(oft_folder)], catch_exceptions=False).output)
    assert (oft["variant"], oft["llm"]["hidden_size"], oft["proprio_dim"], oft["dtype"]) == ("oft", HIDDEN, PROPRIO, ["F32"])
    assert oft["statistics_keys"] == ["libero_spatial_no_noops"] and oft["statistics_source"].endswith("dataset_statistics.json")
    vanilla = json.loads(runner.invoke(main, ["inspect-main", str(openvla_folder)], catch_exceptions=False).output)
    assert (vanilla["variant"], vanilla["statistics_keys"], vanilla["llm"]["num_layers"]) == ("openvla", ["bridge_orig"], 2)
    make_tiny_main().save(tmp_path / "policy")
    policy = json.loads(runner.invoke(main, ["inspect-main", str(tmp_path / "policy")], catch_exceptions=False).output)
    assert (policy["variant"], policy["layout"], policy["llm"]["hidden_size"]) == ("rsd-policy", "rsd", get_preset("tiny").model.llm.hidden_size)
    assert policy["vision"] == [{"conv": "keypoints", "img_size": 64}]  # the tiny preset's conv backbone


def test_bad_layout_options_are_refused(openvla_folder: Path) -> None:
    tiny = get_preset("tiny").model
    with pytest.raises(ConfigError, match="layout"):
        dataclasses.replace(tiny, layout="llava")
    with pytest.raises(ConfigError, match="proprio_dim"):
        VLAConfig(vision=tiny.vision, llm=dataclasses.replace(tiny.llm, vocab_size=32064), tokenizer=tiny.tokenizer, proprio_dim=8, layout="openvla")
    with pytest.raises(ConfigError, match="prompt_end_id"):
        dataclasses.replace(tiny, layout="oft")  # vocabulary 260 has no id 29871
    with pytest.raises(ConfigError, match="use_proprio"):
        _load(openvla_folder, "openvla", use_proprio=True)
    with pytest.raises(ConfigError, match="variant"):
        _load(openvla_folder, "llava")
    with pytest.raises(ConfigError, match="'oft'"):
        vla = _load(openvla_folder, "openvla")
        vla.action_hidden(vla.embed(vla.random_inputs(1, 5)))
    assert isinstance(L1RegressionActionHead(HIDDEN), nn.Module)
