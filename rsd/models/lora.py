"""LoRA fine-tuning (peft) of a trained main model with CogVLA's modules, and its three-part checkpoint.

CogVLA's recipe (seed 003): start from a trained model, add the new modules, put LoRA adapters (the `peft`
library) on the LLM's attention and MLP projections, train the new modules and the other parts outside the LLM in
full, and keep the vision backbone frozen. Every state-dict key of the model belongs to one part (`part_of`):

- **adapter** — the LoRA A/B matrices peft injects into the LLM's linear layers (trained);
- **vision** — the vision backbone (frozen) with CogVLA's aggregation tokens and ViT FiLM (trained in full);
- **trainables** — everything else outside the LLM: the projector or MoE router, the LFP routers, the CAtten
  offsets, the action query and its summary, the proprio projector and the RFSQ head (trained in full);
- **base** — the LLM's own weights (embeddings, norms, the projections under the adapters) and the action
  tokenizer, which come unchanged from the base policy.

`LoRAMainModel.save(out)` writes the merged policy folder `out/` (what `MainModel.load`, `rsd eval` and the runtime
read) and the three-part checkpoint `out/lora/`:

```
lora/
  lora.json                               kind "lora_checkpoint": VLA config, adapter settings, base policy (path,
                                          fingerprint), dataset key, the part files
  lora_adapter.safetensors + .json        the adapter (peft's get_peft_model_state_dict)
  vision_backbone.safetensors + .json     the vision part
  non_lora_trainables.safetensors + .json the trainables part
  dataset_statistics.json  tokenizer/     the statistics and the tokenizer the model was trained with
```

The adapter alone misses what was trained in full; the seed's pitfalls were a missing vision checkpoint and
non-LoRA trainables left out of the merge. `load_lora_checkpoint` therefore refuses a folder that lacks any part,
naming it, refuses keys that no part or the base supplies, refuses non-finite trained weights (a diverged router),
and merges the adapters into the LLM with peft, returning a plain `MainModel`.

Usage:
    main = LoRAMainModel.from_base("runs/plain/policy", CogVLAConfig(aggregation_tokens=4), AdapterConfig(rank=8), tokenizer, stats, "demos")
    ...                                                   # train the parameters with requires_grad
    main.save("runs/cog/policy")                          # merged policy folder + runs/cog/policy/lora
    merged = load_lora_checkpoint("runs/cog/policy/lora") # a MainModel with the adapters merged
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from rsd.config import AdapterConfig, CogVLAConfig, VLAConfig, from_dict, to_dict
from rsd.data.stats import DatasetStatistics, read_dataset_statistics, write_dataset_statistics
from rsd.errors import CheckpointError, ConfigError
from rsd.io import FORMAT_VERSION, load_artifact, read_manifest, save_artifact
from rsd.models.heads import RFSQHead
from rsd.models.main import MainModel
from rsd.models.vla import PrismaticVLA
from rsd.tokenizer import ActionTokenizer

log = logging.getLogger(__name__)

LLM_LINEAR = r"language_model\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"  # the adapters' targets
LORA_DIR = "lora"  # the checkpoint's folder inside a policy folder
CHECKPOINT = "lora"  # lora.json
PARTS = {  # part -> file name, what it holds
    "adapter": ("lora_adapter", "the LoRA adapter of the LLM"),
    "vision": ("vision_backbone", "the vision backbone with CogVLA's aggregation tokens and FiLM"),
    "trainables": ("non_lora_trainables", "the modules trained in full: projector or MoE router, LFP routers, query, head"),
}
TRAINED_VISION = "vla.cogvla.vision."  # the vision part's trained keys (the rest of the vision backbone stays frozen)


def part_of(name: str) -> str:
    """The part ("adapter", "vision", "trainables" or "base") a MainModel state-dict key belongs to."""
    if ".lora_" in name:
        return "adapter"
    if name.startswith(("vla.vision_backbone.", TRAINED_VISION)):
        return "vision"
    if name.startswith(("vla.language_model.", "tokenizer.")):
        return "base"
    return "trainables"


def add_adapters(vla: PrismaticVLA, adapter: AdapterConfig) -> None:
    """Inject LoRA adapters (peft) into the LLM's attention and MLP projections of `vla`, in place."""
    config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, target_modules=LLM_LINEAR)
    inject_adapter_in_model(config, vla)


def mark_trainable(main: MainModel) -> None:
    """Train the adapters, the trainables part and CogVLA's vision modules; freeze the rest (the recipe above)."""
    for name, parameter in main.named_parameters():
        part = part_of(name)
        parameter.requires_grad_(part in ("adapter", "trainables") or name.startswith(TRAINED_VISION))


def merge_adapters(vla: PrismaticVLA) -> PrismaticVLA:
    """Merge every adapter into its linear layer (peft's merge, refusing non-finite results) and put the plain layer back."""
    for name, module in list(vla.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(vla.get_submodule(parent), child, module.get_base_layer())
    if hasattr(vla, "peft_config"):
        del vla.peft_config
    return vla


def transfer_weights(source: nn.Module, target: nn.Module) -> list[str]:
    """Copy every tensor of `source` whose key and shape `target` shares; return the target's keys that got none."""
    theirs = source.state_dict()
    ours = target.state_dict()
    shared = {k: v for k, v in theirs.items() if k in ours and tuple(ours[k].shape) == tuple(v.shape)}
    target.load_state_dict(shared, strict=False)
    return sorted(set(ours) - set(shared))


class LoRAMainModel(MainModel):
    """A MainModel being fine-tuned with LoRA adapters; `save` writes the merged policy folder and the three-part checkpoint."""

    def __init__(self, vla: PrismaticVLA, head: RFSQHead, tokenizer: ActionTokenizer, statistics: DatasetStatistics,
                 dataset_key: str, adapter: AdapterConfig, base: dict[str, str]) -> None:
        super().__init__(vla, head, tokenizer, statistics, dataset_key)
        self.adapter = adapter
        self.base = base  # {"path", "fingerprint"} of the base policy the LLM weights come from

    @classmethod
    def from_base(cls, base: str | Path, cogvla: CogVLAConfig, adapter: AdapterConfig, tokenizer: ActionTokenizer,
                  statistics: DatasetStatistics, dataset_key: str) -> LoRAMainModel:
        """The base policy's model with `cogvla`'s modules added (new, trained in full) and adapters on its LLM."""
        source = MainModel.load(base)
        if not source.tokenizer.same_as(tokenizer):
            raise CheckpointError(f"LoRA fine-tuning: the tokenizer differs from the base policy {base}'s; the head was trained on "
                                  f"that tokenizer's tokens. Pass the base's tokenizer folder ({Path(base) / 'tokenizer'}).")
        config = replace(source.vla.config, cogvla=cogvla)
        vla = PrismaticVLA(config)
        new = transfer_weights(source.vla, vla)
        unused = sorted(set(source.vla.state_dict()) - set(vla.state_dict()) - set(new))
        log.info("LoRA fine-tuning from %s: new parameters (initialised here, trained in full): %s; base weights not used: %s",
                 base, new, unused)
        head = RFSQHead(config.llm.hidden_size, config.tokenizer)
        head.load_state_dict(source.head.state_dict())
        add_adapters(vla, adapter)
        main = cls(vla, head, tokenizer, statistics, dataset_key, adapter, {"path": str(base), "fingerprint": source.fingerprint})
        mark_trainable(main)
        return main

    def merged(self) -> MainModel:
        """A plain MainModel with a copy of these weights and the adapters merged into the LLM (this model keeps training)."""
        vla = merge_adapters(copy.deepcopy(self.vla))
        return MainModel(vla, copy.deepcopy(self.head), self.tokenizer, self.statistics, self.dataset_key).eval()

    def save(self, directory: str | Path) -> str:
        """Write the three-part checkpoint to `directory/lora` and the merged policy folder to `directory`; return its fingerprint."""
        save_lora_checkpoint(self, Path(directory) / LORA_DIR)
        self.fingerprint = self.merged().save(directory)
        return self.fingerprint


def build_policy_model(model: VLAConfig, tokenizer: ActionTokenizer, statistics: DatasetStatistics, dataset_key: str,
                       cogvla: CogVLAConfig | None = None, adapter: AdapterConfig | None = None,
                       base: str | Path | None = None) -> MainModel:
    """The model train-policy trains: `model` (+ `cogvla`) from scratch, or with `adapter` the `base` policy LoRA-fine-tuned."""
    if (adapter is None) != (base is None):
        raise ConfigError(f"train-policy: LoRA fine-tuning needs both an adapter (--lora-rank) and a base policy (--base), got "
                          f"adapter={adapter} and base={base}.")
    if adapter is not None:
        return LoRAMainModel.from_base(base, cogvla or CogVLAConfig(), adapter, tokenizer, statistics, dataset_key)
    config = model if cogvla is None else replace(model, cogvla=cogvla)
    return MainModel(PrismaticVLA(config), RFSQHead(config.llm.hidden_size, config.tokenizer), tokenizer, statistics, dataset_key)


def save_lora_checkpoint(main: LoRAMainModel, directory: str | Path) -> Path:
    """Write the three parts, the statistics, the tokenizer and `lora.json` (see the module docstring)."""
    directory = Path(directory)
    state = main.state_dict()
    tensors: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "trainables": {}}
    for key, value in state.items():
        part = part_of(key)
        if part in tensors:
            tensors[part][key] = value
    tensors["adapter"] = get_peft_model_state_dict(main.vla)
    for part, (name, holds) in PARTS.items():
        save_artifact(directory, name, tensors[part], {"holds": holds}, kind=name)
    write_dataset_statistics(directory / "dataset_statistics.json", {main.dataset_key: main.statistics})
    main.tokenizer.save(directory / "tokenizer")
    manifest = {"kind": "lora_checkpoint", "format_version": FORMAT_VERSION, "config": to_dict(main.vla.config),
                "adapter": to_dict(main.adapter), "base": main.base, "dataset_key": main.dataset_key,
                "parts": {part: f"{name}.safetensors" for part, (name, _) in PARTS.items()}}
    (directory / f"{CHECKPOINT}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def load_lora_checkpoint(directory: str | Path, base: str | Path | None = None, device: torch.device | str | None = None,
                         dtype: torch.dtype | None = None) -> MainModel:
    """Rebuild the fine-tuned model from its base policy (default: the recorded path) and all three parts, adapters merged."""
    directory = Path(directory)
    meta = read_manifest(directory, CHECKPOINT, kind="lora_checkpoint")
    for part, (name, holds) in PARTS.items():
        for suffix in (".safetensors", ".json"):
            if not (directory / f"{name}{suffix}").is_file():
                raise CheckpointError(f"{directory}: expected the {part} part {name}{suffix} ({holds}), found no file. All three parts "
                                      "(lora_adapter, vision_backbone, non_lora_trainables) are needed; re-save the checkpoint.")
    for extra in ("dataset_statistics.json", "tokenizer"):
        if not (directory / extra).exists():
            raise CheckpointError(f"{directory}: expected {extra} beside the parts, found none.")
    source = MainModel.load(base or meta["base"]["path"])
    if source.fingerprint != meta["base"]["fingerprint"]:
        raise CheckpointError(f"{directory}: expected the base policy with fingerprint {meta['base']['fingerprint']}, "
                              f"got {source.fingerprint} from {base or meta['base']['path']}; pass the policy the adapters were trained on.")
    config = from_dict(VLAConfig, meta["config"])
    tokenizer = ActionTokenizer.load(directory / "tokenizer")
    statistics = read_dataset_statistics(directory / "dataset_statistics.json", meta["dataset_key"])
    vla = PrismaticVLA(config)
    from_base = set(vla.state_dict()) - set(transfer_weights(source.vla, vla))
    add_adapters(vla, from_dict(AdapterConfig, meta["adapter"]))
    main = MainModel(vla, RFSQHead(config.llm.hidden_size, config.tokenizer), tokenizer, statistics, meta["dataset_key"])
    expected: dict[str, set[str]] = {"vision": set(), "trainables": set()}
    for key in main.state_dict():
        part = part_of(key)
        if part in expected:
            expected[part].add(key)
        elif part == "base" and not key.startswith("tokenizer.") and key.removeprefix("vla.").replace(".base_layer", "") not in from_base:
            raise CheckpointError(f"{directory}: {key!r} comes from the base policy, which has no tensor of its shape; "
                                  "the base is not the model the adapters were trained on.")
    expected["adapter"] = set(get_peft_model_state_dict(vla))
    for part, (name, _) in PARTS.items():
        tensors, _ = load_artifact(directory, name, kind=name)
        missing, unexpected = sorted(expected[part] - set(tensors)), sorted(set(tensors) - expected[part])
        if missing or unexpected:
            raise CheckpointError(f"{directory / name}.safetensors: the {part} part does not match the model: missing keys "
                                  f"{missing[:8]}, unexpected keys {unexpected[:8]}.")
        _check_finite(tensors, directory / f"{name}.safetensors")
        if part == "adapter":
            set_peft_model_state_dict(vla, tensors)
        else:
            main.load_state_dict(tensors, strict=False)
    merge_adapters(vla)
    vla.finish_loading(device or "cpu", dtype or torch.float32)
    target = next(vla.parameters())
    main.head.to(target.device, target.dtype)
    main.tokenizer.to(target.device)
    log.info("loaded LoRA checkpoint %s on base %s (adapters merged)", directory, meta["base"]["path"])
    return main.eval()


def _check_finite(tensors: dict[str, Any], source: Path) -> None:
    """Refuse trained weights holding NaN or inf (a router that diverged at a high learning rate), naming the tensor."""
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{source}: {key!r} holds NaN or inf; training diverged (docs/pitfalls.md #12). Retrain with a lower "
                                  "learning rate or a longer warm-up.")
