"""Load real OpenVLA and OpenVLA-OFT checkpoints (local HF folders) into `PrismaticVLA`, without trust_remote_code.

OpenVLA's HF export is a folder: `config.json` (Prismatic config: `vision_backbone_id`, `llm_backbone_id`,
`text_config`, `image_sizes`, `norm_stats` ...), `model.safetensors.index.json` + shards (or one
`model.safetensors`), the Llama tokenizer files and, for fine-tuned OFT models, `dataset_statistics.json`,
`action_head--*_checkpoint.pt` and `proprio_projector--*_checkpoint.pt`. `PrismaticVLA` already has OpenVLA's
module names, so loading is a key check plus one rename: OpenVLA's HF port renames timm's LayerScale `gamma`
to `scale_factor` (transformers used to rewrite parameters called `gamma`), so `...ls1.scale_factor` is
stored and rsd's timm ViTs call it `...ls1.gamma`. Every checkpoint key must map onto a model key and every
model key must be filled: anything missing or left over is a CheckpointError listing the keys.

The model is built on the meta device; tensors are read shard by shard with `safe_open`, each converted to
the target device and dtype on its own and assigned (`load_state_dict(assign=True)`), so the peak is the
model plus one tensor, never two copies of the model.

Variants: "openvla" (layout "openvla": the query is the last prompt position; rsd's `action_query` does not
exist in this layout) and "oft" (layout "oft": 56 placeholder positions read by OFT's L1 head, whose mean is
the query; the proprio projector comes from its own `.pt` file, read with `torch.load(weights_only=True)`).

Usage:
    vla = load_openvla("ckpt/openvla-7b-oft-finetuned-libero-spatial", variant="oft", **OFT_LIBERO)
    head = load_l1_head("ckpt/openvla-7b-oft-finetuned-libero-spatial", hidden_size=4096)   # rsd.models.oft_heads
    statistics, source = read_openvla_statistics("ckpt/openvla-7b-oft-finetuned-libero-spatial")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import LlamaConfig

from rsd.config import IMAGENET_MEAN, IMAGENET_STD, LLMConfig, TokenizerConfig, ViTConfig, VLAConfig, from_dict
from rsd.data.stats import DatasetStatistics
from rsd.device import resolve_device_dtype
from rsd.errors import CheckpointError, ConfigError
from rsd.models.vla import LLAMA_FIELDS, MODEL_FILE, PrismaticVLA

log = logging.getLogger(__name__)

VARIANTS = ("openvla", "oft")
OFT_LIBERO: dict[str, Any] = {"num_images": 2, "use_proprio": True, "center_crop": True}  # OFT's LIBERO evaluation setup
SIGLIP_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# Prismatic's vision backbone ids this loader supports: timm ids in channel order and image sizes (configuration_prismatic.py).
VISION_BACKBONES: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "dinosiglip-vit-so-224px": (("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"), (224, 224)),
    "siglip-vit-so400m": (("vit_so400m_patch14_siglip_224",), (224,)),
    "dinov2-vit-l": (("vit_large_patch14_reg4_dinov2.lvd142m",), (224,)),
}
# Per-architecture normalisation (OpenVLA's preprocessor: DINOv2 ImageNet, SigLIP 0.5/0.5).
BACKBONE_NORM = {"vit_large_patch14_reg4_dinov2": (IMAGENET_MEAN, IMAGENET_STD), "vit_so400m_patch14_siglip_224": SIGLIP_NORM}
LLAMA_BACKBONES = ("llama2-7b-pure", "llama2-13b-pure", "llama2-7b-chat", "llama2-13b-chat", "vicuna-v15-7b", "vicuna-v15-13b")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
STATISTICS_FILE = "dataset_statistics.json"
LAYER_SCALE = re.compile(r"^(vision_backbone\.(?:fused_)?featurizer\.blocks\.\d+\.ls[12])\.scale_factor$")


def openvla_key_to_rsd(key: str) -> str:
    """The rsd key of an OpenVLA checkpoint key (LayerScale `scale_factor` → timm's `gamma`; all else unchanged)."""
    return LAYER_SCALE.sub(r"\1.gamma", key)


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The folder's `config.json`, checked to be an OpenVLA (Prismatic) config."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: expected OpenVLA's config.json in the checkpoint folder, found no file.")
    data = json.loads(file.read_text())
    if data.get("model_type") not in ("openvla", "prismatic"):
        raise CheckpointError(f"{file}: expected model_type 'openvla' (or 'prismatic'), got {data.get('model_type')!r}.")
    return data


def _vision_configs(hf: dict[str, Any], overrides: Sequence[dict[str, Any]] | None) -> tuple[ViTConfig, ...]:
    """ViT configs in OpenVLA's channel order from `vision_backbone_id` (checked against the stored timm ids)."""
    backbone = hf.get("vision_backbone_id")
    if backbone not in VISION_BACKBONES:
        raise ConfigError(f"config.json vision_backbone_id: expected one of {sorted(VISION_BACKBONES)}, got {backbone!r}.")
    timm_ids, sizes = VISION_BACKBONES[backbone]
    for field, expected in (("timm_model_ids", list(timm_ids)), ("image_sizes", list(sizes))):
        if field in hf and list(hf[field]) != expected:
            raise CheckpointError(f"config.json {field}: expected {expected} for {backbone!r}, got {hf[field]}.")
    if any(layer is not None for layer in hf.get("timm_override_act_layers", [])):
        raise ConfigError(f"config.json timm_override_act_layers: expected none, got {hf['timm_override_act_layers']}.")
    fused = hf.get("use_fused_vision_backbone")
    fused = backbone.startswith(("dinoclip", "dinosiglip")) if fused is None else fused  # OpenVLA's own rule
    if fused != (len(timm_ids) == 2):
        raise CheckpointError(f"config.json use_fused_vision_backbone: expected {len(timm_ids) == 2} for {backbone!r}, got {fused}.")
    overrides = list(overrides) if overrides is not None else [{}] * len(timm_ids)
    if len(overrides) != len(timm_ids):
        raise ConfigError(f"vision_overrides: expected {len(timm_ids)} dicts (one per backbone), got {len(overrides)}.")
    configs = []
    for timm_id, size, override in zip(timm_ids, sizes, overrides, strict=True):
        name = timm_id.split(".")[0]
        mean, std = BACKBONE_NORM[name]
        configs.append(dataclasses.replace(ViTConfig(timm_name=name, img_size=size, mean=mean, std=std, feature_layer=-2), **override))
    return tuple(configs)


def _llm_config(hf: dict[str, Any]) -> LLMConfig:
    """Llama dimensions from `text_config`, read through transformers' LlamaConfig as OpenVLA itself does (its defaults)."""
    if hf.get("llm_backbone_id") not in LLAMA_BACKBONES:
        raise ConfigError(f"config.json llm_backbone_id: expected a Llama backbone {list(LLAMA_BACKBONES)}, got {hf.get('llm_backbone_id')!r}.")
    text = LlamaConfig(**hf.get("text_config", {}))
    rope = text.rope_parameters or {}
    checks = {"hidden_act": (text.hidden_act, "silu"), "attention_bias": (text.attention_bias, False), "mlp_bias": (text.mlp_bias, False),
              "tie_word_embeddings": (text.tie_word_embeddings, False), "rope_type": (rope.get("rope_type", "default"), "default")}
    for name, (got, expected) in checks.items():
        if got != expected:
            raise ConfigError(f"config.json text_config.{name}: expected {expected!r} (Llama-2), got {got!r}.")
    return LLMConfig(**{ours: getattr(text, theirs) for ours, theirs in LLAMA_FIELDS.items()}, rope_theta=float(rope.get("rope_theta", 10000.0)))


def openvla_config(
    path: str | Path,
    variant: str = "openvla",
    num_images: int = 1,
    proprio_dim: int = 0,
    center_crop: bool = False,
    oft_attention: str = "full",
    vision_overrides: Sequence[dict[str, Any]] | None = None,
    exit_layer: int | None = None,
) -> VLAConfig:
    """The VLAConfig of an OpenVLA folder; `vision_overrides` (one dict of ViTConfig fields per backbone) are for tests."""
    if variant not in VARIANTS:
        raise ConfigError(f"variant: expected one of {list(VARIANTS)}, got {variant!r}.")
    hf = read_hf_config(path)
    strategy = hf.get("image_resize_strategy", "resize-naive")
    if strategy != "resize-naive":
        raise ConfigError(f"config.json image_resize_strategy: expected 'resize-naive' (OpenVLA's), got {strategy!r}.")
    return VLAConfig(
        vision=_vision_configs(hf, vision_overrides),
        llm=_llm_config(hf),
        tokenizer=TokenizerConfig(),
        num_images=num_images,
        proprio_dim=proprio_dim,
        text_tokenizer=str(Path(path)),
        resize_images=True,
        exit_layer=exit_layer,
        layout=variant,
        oft_attention=oft_attention,
        center_crop=center_crop,
    )


def checkpoint_shards(path: str | Path) -> dict[str, Path]:
    """Map every stored tensor name to its safetensors file (index + shards, or one model.safetensors)."""
    folder = Path(path)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        weight_map, files = {}, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{folder}: expected {INDEX_FILE} with its shards or {SINGLE_FILE}, found neither.")
    shards: dict[str, Path] = {}
    for name in files:
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file}: expected this shard (named in {INDEX_FILE}), found no file.")
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key in shards:
                    raise CheckpointError(f"{file}: key {key!r} is also stored in {shards[key]}.")
                shards[key] = file
    listed_elsewhere = sorted(k for k, v in weight_map.items() if shards.get(k) != folder / v)
    if listed_elsewhere:
        raise CheckpointError(f"{index}: keys not found in the shard the index names: {listed_elsewhere}.")
    return shards


def find_component(path: str | Path, name: str) -> Path:
    """The one `{name}--*checkpoint.pt` file of an OFT folder (as OFT's own loader requires exactly one)."""
    folder = Path(path)
    found = sorted(folder.glob(f"{name}--*checkpoint.pt"))
    if len(found) != 1:
        raise CheckpointError(f"{folder}: expected exactly one {name}--*checkpoint.pt file, found {[f.name for f in found]}.")
    return found[0]


def load_component_state_dict(file: str | Path) -> dict[str, torch.Tensor]:
    """A `.pt` state dict read with `torch.load(weights_only=True)`, DDP's `module.` prefix removed (as OFT does)."""
    state = torch.load(str(file), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a state dict of tensors, got {type(state).__name__}.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _refuse_mismatch(source: Path, expected: dict[str, torch.Size], found: dict[str, torch.Size]) -> None:
    """CheckpointError listing missing and unexpected keys, or the first shape mismatch."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: checkpoint does not match PrismaticVLA: missing keys {missing}, unexpected keys {unexpected}.")
    for key, shape in expected.items():
        if tuple(shape) != tuple(found[key]):
            raise CheckpointError(f"{source}: key {key!r} expected shape {tuple(shape)}, got {tuple(found[key])}.")


def load_openvla(
    path: str | Path,
    variant: str = "openvla",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    num_images: int = 1,
    use_proprio: bool = False,
    center_crop: bool = False,
    oft_attention: str = "full",
    vision_overrides: Sequence[dict[str, Any]] | None = None,
    exit_layer: int | None = None,
) -> PrismaticVLA:
    """Load an OpenVLA ("openvla") or OpenVLA-OFT ("oft") folder into PrismaticVLA; every key must match."""
    folder = Path(path)
    if use_proprio and variant != "oft":
        raise ConfigError(f"use_proprio: only the 'oft' variant has a proprio projector, got variant {variant!r}.")
    proprio: dict[str, torch.Tensor] = {}
    if use_proprio:
        proprio_file = find_component(folder, "proprio_projector")
        proprio = {f"proprio_projector.{k}": v for k, v in load_component_state_dict(proprio_file).items()}
        if "proprio_projector.fc1.weight" not in proprio:
            raise CheckpointError(f"{proprio_file}: expected OFT's proprio projector keys fc1/fc2, got {sorted(proprio)}.")
    proprio_dim = int(proprio["proprio_projector.fc1.weight"].shape[1]) if proprio else 0
    config = openvla_config(folder, variant, num_images=num_images, proprio_dim=proprio_dim, center_crop=center_crop,
                            oft_attention=oft_attention, vision_overrides=vision_overrides, exit_layer=exit_layer)
    with torch.device("meta"):
        model = PrismaticVLA(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    files = sorted(set(checkpoint_shards(folder).values()))
    found: dict[str, torch.Size] = {k: v.shape for k, v in proprio.items()}
    for file in files:  # headers only: every key and shape is checked before any tensor is read
        with safe_open(str(file), framework="pt") as handle:
            found.update({openvla_key_to_rsd(k): torch.Size(handle.get_slice(k).get_shape()) for k in handle.keys()})
    _refuse_mismatch(folder, expected, found)
    device, dtype = resolve_device_dtype(device, dtype)
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in proprio.items()}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # one tensor at a time: no second copy of the model
                tensors[openvla_key_to_rsd(key)] = handle.get_tensor(key).to(device=device, dtype=dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    log.info("loaded %s checkpoint %s (%d tensors from %d files)", variant, folder, len(tensors), len(files))
    return model.finish_loading(device, dtype)


def read_openvla_statistics(path: str | Path) -> tuple[dict[str, DatasetStatistics], str]:
    """Statistics per dataset key and their source: `dataset_statistics.json` when present (OFT's rule), else config.json's `norm_stats`."""
    folder = Path(path)
    file = folder / STATISTICS_FILE
    if file.is_file():
        data, source = json.loads(file.read_text()), str(file)
    else:
        hf = read_hf_config(folder)
        if not hf.get("norm_stats"):
            raise CheckpointError(f"{folder}: expected {STATISTICS_FILE} or norm_stats in config.json, found neither.")
        data, source = hf["norm_stats"], str(folder / "config.json")
    return {key: DatasetStatistics.from_json(value) for key, value in data.items()}, source


def _stored_dtypes(files: Sequence[Path]) -> list[str]:
    """The tensor dtypes in safetensors headers (no tensor is read)."""
    dtypes: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            dtypes.update(handle.get_slice(k).get_dtype() for k in handle.keys())
    return sorted(dtypes)


def inspect_main_folder(path: str | Path) -> dict[str, Any]:
    """Variant, dimensions, stored dtype and statistics keys of an OpenVLA/OFT folder or an rsd policy folder (JSON-ready)."""
    folder = Path(path)
    if (folder / "policy.json").is_file():
        meta = json.loads((folder / "vla" / "model.json").read_text())
        config = from_dict(VLAConfig, meta["config"])
        statistics = json.loads((folder / "dataset_statistics.json").read_text())
        files = [folder / "vla" / f"{MODEL_FILE}.safetensors"]
        variant, stats_source = "rsd-policy", str(folder / "dataset_statistics.json")
    elif (folder / "config.json").is_file():
        variant = "oft" if list(folder.glob("action_head--*checkpoint.pt")) else "openvla"
        proprio_dim = 0
        if variant == "oft" and list(folder.glob("proprio_projector--*checkpoint.pt")):
            proprio_dim = int(load_component_state_dict(find_component(folder, "proprio_projector"))["fc1.weight"].shape[1])
        config = openvla_config(folder, variant, proprio_dim=proprio_dim)
        stats, stats_source = read_openvla_statistics(folder)
        statistics = dict.fromkeys(stats)
        files = sorted(set(checkpoint_shards(folder).values()))
    else:
        raise CheckpointError(f"{folder}: expected an OpenVLA folder (config.json) or an rsd policy folder (policy.json), found neither.")
    llm = config.llm
    return {
        "path": str(folder),
        "variant": variant,
        "layout": config.layout,
        "vision": [{"timm_name": v.timm_name, "img_size": v.img_size} if isinstance(v, ViTConfig) else {"conv": v.tokens, "img_size": v.img_size}
                   for v in config.vision],
        "llm": {"hidden_size": llm.hidden_size, "num_layers": llm.num_layers, "num_heads": llm.num_heads,
                "num_kv_heads": llm.num_kv_heads, "intermediate_size": llm.intermediate_size, "vocab_size": llm.vocab_size},
        "proprio_dim": config.proprio_dim,
        "dtype": _stored_dtypes(files),
        "weight_files": [f.name for f in files],
        "statistics_keys": sorted(statistics),
        "statistics_source": stats_source,
    }
