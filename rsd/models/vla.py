"""PrismaticVLA: vision backbone(s) → fused MLP projector → Llama, with a segmented (early-exit) forward.

The early-exit design is in docs/architecture.md. The module layout follows OpenVLA's checkpoint
(`vision_backbone.featurizer`, `vision_backbone.fused_featurizer`, `projector.fc1/2/3`, `language_model.model.*`,
`language_model.lm_head`) so real weights map onto it by name; `lm_head` is unused by the action heads but kept so
the layout and the parameter count are OpenVLA's. When the config has proprio, OFT's `proprio_projector` is added.
Observations become model inputs in `rsd.models.processor` (`vla.processor`); `encode_inputs` puts them on the
model's device.

Sequence layouts (`VLAConfig.layout`); the *readout* positions are those whose hidden states the draft and the
heads read, and the query hidden `[B, D]` is their mean:
- "rsd" (default): `BOS, patches of camera 0 (, camera 1 ...), [proprio token], prompt, action query` with a
  learned `action_query` embedding; causal attention; readout = the query position.
- "openvla": `BOS, patches, prompt, 29871` (the token OpenVLA's `predict_action` appends); causal; readout = the
  last prompt position, i.e. the hidden state from which OpenVLA's `lm_head` predicts the first action token.
  No `action_query` parameter (OpenVLA has none).
- "oft": `BOS, patches, [proprio token], prompt, 29871, 56 zero-embedding placeholders, </s>`; attention over
  the whole sequence is bidirectional (`oft_attention="full"`, what OFT's transformers fork does at inference) or
  causal with the 56 placeholders attending to each other (`"action_block"`); readout = OFT's 56 action positions
  `P .. P+55` with `P = num_patches (+1 proprio) + prompt_len - 1` (the last prompt token and the first 55
  placeholders: OFT's one-position shift from next-token alignment). The L1 head reads all 56
  (`action_hidden`); the query hidden for the draft and the RFSQ head is their mean. No `action_query`.
Prompts of different lengths are right-padded; padding is masked out as keys and position ids count only real
tokens, so a batched row equals the same row run alone (the readout positions are gathered per row).

CogVLA's efficiency modules (`VLAConfig.cogvla`, all off by default; `rsd.models.cogvla`) hook in at three places:
the visual tokens (`embed`: aggregation tokens, FiLM, MoE), the action block (`_tail`, `_attention_pattern`,
`_readout`: CAtten) and the layer loop (`advance`: LFP pruning, carried along in `PrefixState.pruning`).

Segmented forward: `embed(inputs)` → `PrefixState` at layer 0; `advance(state, k)` runs layers up to k;
`resume(state)` runs the remaining layers and the final norm and returns the query hidden `[B, D]`.
`resume(prefix(x, k)) == forward(x)` for every k in 0..N and every layout.

Usage:
    vla = PrismaticVLA(get_preset("tiny").model)
    inputs = vla.encode_inputs(images, ["pick up the red block"], proprio)   # images uint8 [B, N, H, W, 3]
    state = vla.prefix(inputs, exit_layer=3)       # state.query_hidden [B, D] feeds the draft
    hidden = vla.resume(state)                      # [B, D] feeds the RFSQ head
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from rsd.config import ConvConfig, ViTConfig, VLAConfig, from_dict, to_dict
from rsd.errors import ConfigError
from rsd.io import load_artifact, load_strict, save_artifact
from rsd.models.cogvla import CogVLA, PruneState
from rsd.models.conv import ConvBackbone
from rsd.models.processor import VLAInputs, VLAProcessor
from rsd.models.text import TextTokenizer

MODEL_FILE = "model"


@dataclass
class PrefixState:
    """Every position's hidden state after `layer` LLM layers, with what the remaining layers need."""

    hidden: torch.Tensor  # [B, S, D] residual stream after `layer` layers
    attention_mask: torch.Tensor  # [B, 1, S, S] additive mask (causal, padding masked as keys)
    position_ids: torch.Tensor  # [B, S] positions counting real tokens only
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # rotary (cos, sin), each [B, S, head_dim]
    layer: int  # layers already run (0 .. N)
    readout: torch.Tensor  # [B, R] int64 positions the heads read (R = 1, A with CAtten, or 56 for the oft layout)
    pruning: PruneState | None = None  # LFP (cogvla): the routers' condition and the visual tokens left; None without LFP

    def readout_hidden(self) -> torch.Tensor:
        """Residual stream at the readout positions `[B, R, D]` (before the final norm)."""
        index = self.readout.unsqueeze(-1).expand(-1, -1, self.hidden.shape[-1])
        return self.hidden.gather(1, index)

    @property
    def query_hidden(self) -> torch.Tensor:
        """Query hidden `[B, D]`: the mean over the readout positions (the one position for rsd/openvla)."""
        return self.readout_hidden().mean(dim=1)

    def select(self, rows: torch.Tensor) -> PrefixState:
        """The state of batch rows `rows` only (for resuming rejected rows)."""
        cos, sin = self.position_embeddings
        return replace(self, hidden=self.hidden[rows], attention_mask=self.attention_mask[rows], position_ids=self.position_ids[rows],
                       position_embeddings=(cos[rows], sin[rows]), readout=self.readout[rows],
                       pruning=None if self.pruning is None else self.pruning.select(rows))


def build_vit(config: ViTConfig) -> nn.Module:
    """A timm ViT from its config (no pretrained download; weights come from rsd or OpenVLA checkpoints)."""
    overrides = {k: v for k, v in (("patch_size", config.patch_size), ("embed_dim", config.embed_dim), ("depth", config.depth),
                                   ("num_heads", config.num_heads)) if v is not None}
    return timm.create_model(config.timm_name, pretrained=False, num_classes=0, img_size=config.img_size, **overrides)


class VisionBackbone(nn.Module):
    """One or two ViTs whose patch features of one block are concatenated per patch (OpenVLA's fused backbone),
    or one conv backbone (`rsd.models.conv`) whose keypoint or grid tokens play the patches' part."""

    def __init__(self, configs: tuple[ViTConfig | ConvConfig, ...], condition_dim: int = 0) -> None:
        super().__init__()
        if len(configs) > 2:
            raise ConfigError(f"VLAConfig.vision: expected one or two backbones (OpenVLA fuses two), got {len(configs)}.")
        self.configs = configs
        if isinstance(configs[0], ConvConfig):
            self.featurizer = ConvBackbone(configs[0], condition_dim)
            self.fused_featurizer = None
            self.embed_dim = self.featurizer.embed_dim
            self.num_patches = self.featurizer.num_patches
            return
        self.featurizer = build_vit(configs[0])
        self.fused_featurizer = build_vit(configs[1]) if len(configs) == 2 else None
        self.embed_dim = sum(m.embed_dim for m in self.featurizers())
        patches = {m.patch_embed.num_patches for m in self.featurizers()}
        if len(patches) != 1:
            raise ConfigError(f"VLAConfig.vision: expected backbones with one patch count, got {sorted(patches)}.")
        self.num_patches = patches.pop()

    def featurizers(self) -> list[nn.Module]:
        """The ViTs in channel order."""
        return [self.featurizer] + ([self.fused_featurizer] if self.fused_featurizer is not None else [])

    def forward(self, pixel_values: torch.Tensor, prompt: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch features `[B, P, Dv]` for pixel values `[B, 3 * backbones, S, S]` (a FiLM-conditioned conv backbone
        also reads the instruction's token embeddings `[B, T, E]` and mask `[B, T]`)."""
        if isinstance(self.featurizer, ConvBackbone):
            return self.featurizer(pixel_values, prompt, prompt_mask)
        features = []
        for index, (vit, config) in enumerate(zip(self.featurizers(), self.configs, strict=True)):
            block = config.feature_layer % len(vit.blocks)
            images = pixel_values[:, 3 * index : 3 * index + 3]
            features.append(vit.forward_intermediates(images, indices=[block], norm=False, output_fmt="NLC",
                                                      intermediates_only=True, stop_early=True)[0])
        return torch.cat(features, dim=-1)


class FusedProjector(nn.Module):
    """OpenVLA's fused projector: Linear(Dv, 4 Dv) → GELU → Linear(4 Dv, D) → GELU → Linear(D, D)."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`[..., Dv]` → `[..., D]`."""
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(features)))))


class ProprioProjector(nn.Module):
    """OpenVLA-OFT's proprio projector: Linear(P, D) → GELU → Linear(D, D)."""

    def __init__(self, proprio_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        """`[B, P]` → `[B, D]`."""
        return self.fc2(F.gelu(self.fc1(proprio)))


# LLMConfig field -> the transformers LlamaConfig field of the same meaning, both ways (OpenVLA loading reads them
# back); rope_theta and the init std are passed on their own.
LLAMA_FIELDS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
}


def llama_config(config: VLAConfig) -> LlamaConfig:
    """transformers' LlamaConfig for the LLM part, with SDPA attention."""
    llm = config.llm
    return LlamaConfig(**{theirs: getattr(llm, ours) for ours, theirs in LLAMA_FIELDS.items()}, rope_theta=llm.rope_theta,
                       tie_word_embeddings=False, initializer_range=llm.initializer_range, attn_implementation="sdpa")


class PrismaticVLA(nn.Module):
    """The main model with an early-exit forward: images + instruction (+ proprio) → query hidden `[B, D]`."""

    def __init__(self, config: VLAConfig, text_tokenizer: TextTokenizer | None = None) -> None:
        super().__init__()
        self.config = config
        self.vision_backbone = VisionBackbone(config.vision, config.llm.hidden_size)
        # CogVLA's MoE router projects each ViT apart and replaces the fused projector (rsd.models.cogvla).
        self.projector = None if config.cogvla.moe else FusedProjector(self.vision_backbone.embed_dim, config.llm.hidden_size)
        vits = [] if isinstance(config.vision[0], ConvConfig) else self.vision_backbone.featurizers()
        self.cogvla = CogVLA(config, vits, self.vision_backbone.num_patches) if config.cogvla.enabled else None
        self.language_model = LlamaForCausalLM(llama_config(config))
        # Only rsd's own layout has a learned query; openvla/oft read positions of OpenVLA's own sequence.
        self.action_query = nn.Parameter(torch.randn(config.llm.hidden_size) * config.llm.initializer_range) if config.layout == "rsd" else None
        # The query's own view of the image: a linear map of every visual token, so it need not first learn where to attend.
        per_image = self.vision_backbone.num_patches if self.cogvla is None else self.cogvla.tokens_per_image
        tokens = config.num_images * per_image * config.llm.hidden_size
        self.query_summary = nn.Linear(tokens, config.llm.hidden_size) if config.query_summary else None
        self.proprio_projector = ProprioProjector(config.proprio_dim, config.llm.hidden_size) if config.proprio_dim else None
        self.processor = VLAProcessor(config, text_tokenizer)

    @property
    def layers(self) -> nn.ModuleList:
        """The N Llama decoder layers."""
        return self.language_model.model.layers

    @property
    def text_tokenizer(self) -> TextTokenizer:
        """The prompt tokenizer named by the config (built on first use)."""
        return self.processor.text_tokenizer

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        parameter = self.language_model.model.embed_tokens.weight
        return parameter.device, parameter.dtype

    def preprocess_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 `[B, N, H, W, 3]` → normalised pixel values `[B, N, 3 * backbones, S, S]` (`VLAProcessor.images`)."""
        return self.processor.images(images)

    def encode_inputs(self, images: np.ndarray | torch.Tensor, instructions: list[str], proprio: torch.Tensor | None = None) -> VLAInputs:
        """Model inputs on the model's device from images `[B, N, H, W, 3]`, B instructions and normalised proprio `[B, P]`."""
        return self.processor(images, instructions, proprio).to(self._device_dtype()[0])

    def random_inputs(self, batch: int = 1, prompt_len: int = 24, seed: int = 0) -> VLAInputs:
        """Random images and prompt ids of the model's shapes on its device (latency work without a text tokenizer)."""
        return self.processor.random_inputs(batch, prompt_len, seed).to(self._device_dtype()[0])

    def embed(self, inputs: VLAInputs) -> PrefixState:
        """Vision, projector and embeddings: the state at layer 0 with masks and rotary embeddings."""
        device, dtype = self._device_dtype()
        batch = inputs.batch_size
        pixels = inputs.pixel_values.to(device, dtype)
        cams = pixels.shape[1]
        embed_tokens = self.language_model.model.embed_tokens
        text_mask = inputs.text_mask.to(device)
        prompt = embed_tokens(inputs.input_ids.to(device))  # [B, T, D]
        image_prompt, image_mask = prompt.repeat_interleave(cams, dim=0), text_mask.repeat_interleave(cams, dim=0)
        if self.cogvla is None:
            patches = self.projector(self.vision_backbone(pixels.flatten(0, 1), image_prompt, image_mask))  # [B*N, P, D]
        else:
            patches = self.cogvla.visual_tokens(self.vision_backbone, self.projector, pixels.flatten(0, 1), image_prompt, image_mask)
        patches = patches.reshape(batch, cams * patches.shape[1], -1)
        bos = embed_tokens(torch.full((batch, 1), self.processor.bos_id, dtype=torch.int64, device=device))
        parts = [bos, patches]
        if self.proprio_projector is not None:
            parts.append(self.proprio_projector(inputs.proprio.to(device, dtype)).unsqueeze(1))
        fixed = sum(part.shape[1] for part in parts)  # BOS, patches, proprio: never padded
        prompt_end = fixed + inputs.input_ids.shape[1]  # first position after the (padded) prompt
        parts += [prompt, self._tail(batch, device, dtype, patches)]
        hidden = torch.cat(parts, dim=1)
        length = hidden.shape[1]
        valid = torch.cat([torch.ones(batch, fixed, dtype=torch.bool, device=device), text_mask,
                           torch.ones(batch, length - prompt_end, dtype=torch.bool, device=device)], dim=1)
        position_ids = (valid.cumsum(dim=1) - 1).clamp_min(0)
        allowed = self._attention_pattern(length, prompt_end, device).unsqueeze(0) & valid.unsqueeze(1)
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=device).unsqueeze(0)  # padded rows see themselves
        mask = torch.zeros(batch, 1, length, length, dtype=dtype, device=device).masked_fill(~allowed.unsqueeze(1), torch.finfo(dtype).min)
        rotary = self.language_model.model.rotary_emb(hidden, position_ids=position_ids)
        last_prompt = (fixed + text_mask.sum(dim=1) - 1).unsqueeze(1)  # [B, 1] last real prompt token of each row
        pruning = None if self.cogvla is None else self.cogvla.pruning(prompt, text_mask, patches.shape[1])
        return PrefixState(hidden=hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary, layer=0,
                           readout=self._readout(last_prompt, prompt_end, length), pruning=pruning)

    def _tail(self, batch: int, device: torch.device, dtype: torch.dtype, patches: torch.Tensor) -> torch.Tensor:
        """Embeddings after the prompt `[B, T, D]`: the query (rsd), nothing (openvla), or 56 zeros + `</s>` (oft)."""
        config = self.config
        width = config.llm.hidden_size
        if config.layout == "rsd":
            query = self.action_query.to(dtype).expand(batch, 1, -1)
            query = query if self.cogvla is None else self.cogvla.action_block(query)  # CAtten: [B, A, D]
            return query if self.query_summary is None else query + self.query_summary(patches.flatten(1)).unsqueeze(1)
        if config.layout == "openvla":
            return torch.zeros(batch, 0, width, dtype=dtype, device=device)
        stop = self.language_model.model.embed_tokens(torch.full((batch, 1), config.stop_id, dtype=torch.int64, device=device))
        return torch.cat([torch.zeros(batch, config.num_action_tokens, width, dtype=dtype, device=device), stop], dim=1)

    def _attention_pattern(self, length: int, prompt_end: int, device: torch.device) -> torch.Tensor:
        """Which position may attend to which `[S, S]` bool, before padding is masked."""
        config = self.config
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        if config.layout != "oft":
            actions = config.cogvla.action_tokens  # CAtten: the last A positions (the action tokens) see each other
            if actions:
                causal[-actions:, -actions:] = True
            return causal
        if config.oft_attention == "full":
            return torch.ones(length, length, dtype=torch.bool, device=device)
        block = torch.zeros(length, dtype=torch.bool, device=device)
        block[prompt_end : prompt_end + config.num_action_tokens] = True
        return causal | (block.unsqueeze(0) & block.unsqueeze(1))

    def _readout(self, last_prompt: torch.Tensor, prompt_end: int, length: int) -> torch.Tensor:
        """Readout positions `[B, R]` for the layout, from each row's last prompt position `[B, 1]`."""
        if self.config.layout == "rsd":
            actions = max(1, self.config.cogvla.action_tokens)
            return torch.arange(length - actions, length, device=last_prompt.device).expand(last_prompt.shape[0], -1)
        if self.config.layout == "openvla":
            return last_prompt
        # OFT's shift: the last prompt token, then the first 55 placeholders (the hidden state at i predicts token i+1).
        block = prompt_end + torch.arange(self.config.num_action_tokens - 1, device=last_prompt.device)
        return torch.cat([last_prompt, block.unsqueeze(0).expand(last_prompt.shape[0], -1)], dim=1)

    def advance(self, state: PrefixState, exit_layer: int) -> PrefixState:
        """Run LLM layers `state.layer .. exit_layer-1` on a state; return the state after `exit_layer` layers."""
        num_layers = self.config.llm.num_layers
        if not isinstance(exit_layer, int) or not state.layer <= exit_layer <= num_layers:
            raise ConfigError(f"exit_layer: expected an int in {state.layer}..{num_layers}, got {exit_layer!r}.")
        hidden = state.hidden
        for index in range(state.layer, exit_layer):
            if state.pruning is not None:  # LFP: only the kept visual tokens enter a routing layer and the layers after it
                state = self.cogvla.prune(replace(state, hidden=hidden), index)
                hidden = state.hidden
            hidden = self.layers[index](hidden, attention_mask=state.attention_mask, position_ids=state.position_ids,
                                        position_embeddings=state.position_embeddings)
        return replace(state, hidden=hidden, layer=exit_layer)

    def prefix(self, inputs: VLAInputs, exit_layer: int) -> PrefixState:
        """Vision, projector and LLM layers `0 .. exit_layer-1`: the early-exit state."""
        return self.advance(self.embed(inputs), exit_layer)

    def final_readout(self, state: PrefixState) -> torch.Tensor:
        """Run the remaining layers `state.layer .. N-1`; the final-norm hidden states at the readout `[B, R, D]`."""
        final = self.advance(state, self.config.llm.num_layers)
        return self.language_model.model.norm(final.readout_hidden())

    def resume(self, state: PrefixState) -> torch.Tensor:
        """Run the remaining layers and the final norm; return the query hidden `[B, D]` (mean over the readout)."""
        return self.final_readout(state).mean(dim=1)

    def action_hidden(self, state: PrefixState) -> torch.Tensor:
        """OFT's action hidden states `[B, 56, D]` (`last_hidden[:, P : P + 56]`), what the L1 head reads."""
        if self.config.layout != "oft":
            raise ConfigError(f"VLAConfig.layout: expected 'oft' for action hidden states, got {self.config.layout!r}.")
        return self.final_readout(state)

    def forward(self, inputs: VLAInputs) -> torch.Tensor:
        """The plain full forward: final query hidden `[B, D]`."""
        return self.resume(self.embed(inputs))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `model.safetensors` + `model.json` (config, format version, sha256)."""
        return save_artifact(directory, MODEL_FILE, self.state_dict(), {"config": to_dict(self.config)}, kind="vla")

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PrismaticVLA:
        """Rebuild from `model.json` on the meta device and assign the weights (missing or unexpected keys are errors)."""
        tensors, meta = load_artifact(directory, MODEL_FILE, kind="vla")
        config = from_dict(VLAConfig, meta["config"])
        with torch.device("meta"):
            model = cls(config)
        load_strict(model, tensors, Path(directory) / f"{MODEL_FILE}.safetensors")
        return model.finish_loading(device or "cpu", dtype or torch.float32)

    def finish_loading(self, device: torch.device | str, dtype: torch.dtype) -> PrismaticVLA:
        """Move to `device`/`dtype`; rebuild the rotary tables (the only non-persistent buffers) there, kept in fp32."""
        model = self.language_model.model
        with torch.device(device):
            model.rotary_emb = LlamaRotaryEmbedding(self.language_model.config)
            self.to(device=device, dtype=dtype)
            model.rotary_emb = LlamaRotaryEmbedding(self.language_model.config)
        return self.eval()

    @classmethod
    def random(cls, config: VLAConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> PrismaticVLA:
        """The model with seeded random weights (N(0, 0.02), norms at 1), built directly on `device` (latency work)."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.ndim == 1 and ("norm" in name or name.endswith(".gamma")):
                    parameter.fill_(1.0)
                elif name.endswith("bias"):
                    parameter.zero_()
                else:
                    parameter.normal_(0.0, 0.02, generator=generator)
            for _, buffer in model.named_buffers():
                buffer.zero_()
        return model.finish_loading(device, dtype)

    def describe(self) -> dict[str, Any]:
        """Parameter counts per part (JSON-ready)."""
        def count(module: nn.Module | None) -> int:
            return 0 if module is None else sum(p.numel() for p in module.parameters())

        return {
            "vision_backbone": count(self.vision_backbone),
            "projector": count(self.projector),
            "cogvla": count(self.cogvla),
            "language_model": count(self.language_model),
            "proprio_projector": count(self.proprio_projector),
            "total": count(self),
        }
