"""CogVLA's efficiency modules (seed 003) as options of PrismaticVLA (`VLAConfig.cogvla`), each off by default.

CogVLA cuts the main model's compute before any speculation; rsd's early exit then skips the upper layers of what
is left, so the two multiply. The four modules, in the seed's debug order (`debug_order`):

1. **Aggregation tokens** (`aggregation_tokens`): learned tokens appended inside each ViT after the position
   embeddings; they attend to the patches in every block and only their outputs become visual tokens (CogVLA:
   256 patches → 64 tokens per image). The ViT still runs on all its patches, so the vision stage costs a little
   *more*; the LLM, which dominates, sees 4× fewer visual tokens. ViT backbones only (the conv backbone emits
   few tokens already and has its own FiLM).
2. **FiLM in the ViTs** (`film`): after every ViT block up to the feature block the tokens are scaled and
   shifted, `x * (1 + γ(c)) + β(c)`, by a linear map of the instruction condition `c`. The maps start at zero,
   so an untrained FiLM is the identity and a plain checkpoint fine-tunes from where it was.
3. **MoE router** (`moe`, two ViTs): each ViT's tokens are projected to the LLM width on their own
   (`featurizer_proj`, `fused_featurizer_proj`) and mixed with weights `softmax(MLP(c))` over the two experts;
   this replaces the fused projector. The router runs in fp32, so an fp16 model's router cannot overflow into
   NaN mixing weights (seed pitfall: router NaNs at a high learning rate).
4. **LFP token pruning** (`lfp_layers`): before each routing layer an instruction-FiLMed router scores the visual
   tokens still in the sequence and keeps the top `round(V * r_j)` of the `V` visual tokens the sequence started
   with; BOS, proprio, prompt and action tokens are never scored, so never pruned. The keep ratio follows a
   shifted cosine from `lfp_keep[0]` to `lfp_keep[1]` sampled at the midpoints of the M routing layers,
   `r_j = last + (first - last) * (1 + cos(pi * (j + 0.5) / M)) / 2`, whose mean is `(first + last) / 2` — 0.5
   for CogVLA's `shiftedcos_decay_0.85_0.15` with `lfp_average_factor=0.5`. Pruned tokens leave the residual
   stream for good: the layers after a routing layer run on the shorter sequence. (The seed's code scatters
   unrouted tokens back so later layers still pay for them; its own per-layer token counts are those of a
   shrinking sequence, which is what saves the FLOPs.) Top-k has no gradient, so the kept tokens are multiplied
   by a straight-through gate `1 + (g - stopgrad(g))`, `g = sigmoid(score)`: exactly 1 in value, and the router
   learns whether a kept token helped the loss.
5. **CAtten** (`action_tokens`, rsd layout): the learned action query becomes A action tokens (the query plus a
   learned offset each, offsets starting at zero) that attend to each other bidirectionally while attention stays
   causal everywhere else; the readout is their mean. (The oft layout has this already:
   `oft_attention="action_block"`.)

The conditioning `c` is the layer-normalised mean of the prompt's token embeddings (CogVLA's "mean language
embedding"); the LLM itself still reads the words in order.

Segmented forward with LFP: a state after `k` layers has been pruned by the routers of layers `< k` and holds
`PruneState`; `resume` prunes at the routing layers `>= k` on its way, so `resume(prefix(x, k)) == forward(x)` for
every k. Visual tokens sit right after BOS in every layout and stay contiguous when pruned; the readout positions
(never visual) are shifted with them, so the draft reads the query at the exit layer whatever was pruned.

Usage:
    config = dataclasses.replace(get_preset("openvla-7b").model, cogvla=CogVLAConfig(aggregation_tokens=64, moe=True))
    vla = PrismaticVLA(config)                      # vla.cogvla holds the new modules
    state = vla.prefix(inputs, exit_layer=16)       # pruned on the way; state.query_hidden feeds the draft
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from rsd.config import CogVLAConfig, ViTConfig, VLAConfig
from rsd.errors import ShapeError

ROUTER_WIDTH = 32  # hidden width of the MoE and LFP routers (at D = 4096: 131K and 393K parameters; CogVLA's: ~131K and ~32K)
VISUAL_START = 1  # the visual tokens follow BOS in every layout
AGGREGATION_INIT_STD = 0.02  # init of the aggregation tokens (timm's init of learned prefix tokens)


class SegmentState(Protocol):
    """What `CogVLA.prune` reads of a `rsd.models.vla.PrefixState` (a dataclass; pruning returns a replaced copy)."""

    hidden: torch.Tensor  # [B, S, D]
    attention_mask: torch.Tensor  # [B, 1, S, S]
    position_ids: torch.Tensor  # [B, S]
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # each [B, S, head_dim]
    readout: torch.Tensor  # [B, R]
    pruning: PruneState | None


def instruction_condition(prompt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The condition `c` `[B, E]` fp32: the layer-normalised mean of the real prompt tokens' embeddings `[B, T, E]` (mask `[B, T]`)."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    mean = (prompt.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    return F.layer_norm(mean, mean.shape[-1:])


def keep_schedule(config: CogVLAConfig, visual: int) -> list[int]:
    """Visual tokens kept after each routing layer, of `visual` at the start (shifted cosine at the layers' midpoints)."""
    first, last = config.lfp_keep
    count = len(config.lfp_layers)
    ratios = [last + (first - last) * (1.0 + math.cos(math.pi * (j + 0.5) / count)) / 2.0 for j in range(count)]
    return [max(1, min(visual, round(visual * r))) for r in ratios]


def debug_order(config: VLAConfig, num_patches: int) -> list[tuple[str, VLAConfig]]:
    """The seed's debug order, each module added to the previous row: plain → +aggregation → +FiLM → +MoE → +LFP → +CAtten.

    Settings scale with the model as CogVLA's do on OpenVLA-7B: a quarter of the `num_patches` patches per image as
    aggregation tokens (256 → 64), a routing layer every N // 6 layers (5, 10, ..., 30 of 32), one action token per chunk step.
    Modules a model cannot take are left out: aggregation and FiLM need ViTs, MoE two of them, CAtten the rsd layout.
    """
    plain = dataclasses.replace(config, cogvla=CogVLAConfig())
    vits = [v for v in config.vision if isinstance(v, ViTConfig)]
    step = max(1, config.llm.num_layers // 6)
    additions: list[tuple[str, dict[str, object]]] = []
    if vits:
        additions += [("+aggregation", {"aggregation_tokens": max(1, num_patches // 4)}), ("+FiLM", {"film": True})]
    if len(vits) == 2:
        additions.append(("+MoE", {"moe": True}))
    additions.append(("+LFP", {"lfp_layers": tuple(range(step, config.llm.num_layers, step))}))
    if config.layout == "rsd":
        additions.append(("+CAtten", {"action_tokens": config.tokenizer.chunk_len}))
    rows = [("plain", plain)]
    for name, change in additions:
        previous = rows[-1][1]
        rows.append((name, dataclasses.replace(previous, cogvla=dataclasses.replace(previous.cogvla, **change))))
    return rows


def _linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` computed in fp32 whatever the model's dtype (routers must not overflow in fp16)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def _check_finite(values: torch.Tensor, where: str) -> None:
    """Refuse non-finite router outputs while training (the seed's router-NaN pitfall), naming the router."""
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise ShapeError(f"{where}: expected finite router outputs, got {bad} NaN/inf of {values.numel()}; the router diverged — "
                         "lower the learning rate or lengthen the warm-up (docs/pitfalls.md #12).")


def _zero_linear(fan_in: int, fan_out: int) -> nn.Linear:
    """A linear map that starts at zero (FiLM starts as the identity)."""
    layer = nn.Linear(fan_in, fan_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class CogVision(nn.Module):
    """Aggregation tokens and/or FiLM inside each ViT: images → tokens `[B, T, Dv_i]` per ViT (T = aggregation or patch tokens)."""

    def __init__(self, vits: list[nn.Module], configs: tuple[ViTConfig, ...], condition_dim: int, aggregation: int, film: bool) -> None:
        super().__init__()
        self.blocks = [config.feature_layer % len(vit.blocks) for vit, config in zip(vits, configs, strict=True)]
        self.aggregation = nn.ParameterList(
            nn.Parameter(torch.randn(aggregation, vit.embed_dim) * AGGREGATION_INIT_STD) for vit in vits) if aggregation else None
        self.film = nn.ModuleList(
            nn.ModuleList(_zero_linear(condition_dim, 2 * vit.embed_dim) for _ in range(block + 1))
            for vit, block in zip(vits, self.blocks, strict=True)) if film else None

    def forward(self, vits: list[nn.Module], pixels: torch.Tensor, condition: torch.Tensor) -> list[torch.Tensor]:
        """Tokens of each ViT for pixel values `[B, 3 * ViTs, S, S]` and the condition `[B, E]` (fp32)."""
        outputs = []
        for index, (vit, block) in enumerate(zip(vits, self.blocks, strict=True)):
            x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixels[:, 3 * index : 3 * index + 3]))))
            if self.aggregation is not None:
                tokens = self.aggregation[index].to(x.dtype)
                x = torch.cat([x, tokens.expand(x.shape[0], -1, -1)], dim=1)
            for depth, layer in enumerate(vit.blocks[: block + 1]):
                x = layer(x)
                if self.film is not None:
                    scale, shift = self.film[index][depth](condition.to(x.dtype)).unsqueeze(1).chunk(2, dim=-1)
                    x = x * (1.0 + scale) + shift
            outputs.append(x[:, -self.aggregation[index].shape[0] :] if self.aggregation is not None else x[:, vit.num_prefix_tokens :])
        return outputs


class MoERouter(nn.Module):
    """Two experts' tokens `[B, T, Dv_i]` → `[B, T, D]`: per-expert projections mixed by `softmax(MLP(c))` (fp32)."""

    def __init__(self, widths: list[int], width: int) -> None:
        super().__init__()
        self.featurizer_proj = nn.Linear(widths[0], width)
        self.fused_featurizer_proj = nn.Linear(widths[1], width)
        self.router_in = nn.Linear(width, ROUTER_WIDTH)
        self.router_out = nn.Linear(ROUTER_WIDTH, 2)

    def mixing(self, condition: torch.Tensor) -> torch.Tensor:
        """Mixing weights `[B, 2]` fp32 (rows sum to 1) for the condition `[B, E]`."""
        logits = _linear32(self.router_out, F.gelu(_linear32(self.router_in, condition)))
        if self.training:
            _check_finite(logits, "MoE router")
        return torch.softmax(logits, dim=-1)

    def forward(self, features: tuple[torch.Tensor, ...], condition: torch.Tensor) -> torch.Tensor:
        """Mixed visual tokens `[B, T, D]`."""
        first, second = self.featurizer_proj(features[0]), self.fused_featurizer_proj(features[1])
        weights = self.mixing(condition).to(first.dtype)
        return weights[:, 0, None, None] * first + weights[:, 1, None, None] * second


class LFPRouter(nn.Module):
    """Scores of visual tokens `[B, V, D]` → `[B, V]` fp32: `w · GELU(down(norm(h)) * (1 + γ(c)) + β(c))`."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, ROUTER_WIDTH)
        self.film = _zero_linear(width, 2 * ROUTER_WIDTH)
        self.score = nn.Linear(ROUTER_WIDTH, 1)

    def forward(self, hidden: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Scores `[B, V]` of hidden states `[B, V, D]` under the condition `[B, E]`."""
        features = _linear32(self.down, F.layer_norm(hidden.float(), hidden.shape[-1:]))
        scale, shift = _linear32(self.film, condition).unsqueeze(1).chunk(2, dim=-1)
        return _linear32(self.score, F.gelu(features * (1.0 + scale) + shift)).squeeze(-1)


@dataclass
class PruneState:
    """What LFP needs along the segmented forward: the routers' condition and how many visual tokens are left."""

    condition: torch.Tensor  # [B, E] fp32 instruction condition the routers read
    visual: int  # visual tokens left, at positions VISUAL_START .. VISUAL_START + visual - 1

    def select(self, rows: torch.Tensor) -> PruneState:
        """The state of batch rows `rows` only."""
        return dataclasses.replace(self, condition=self.condition[rows])


class CogVLA(nn.Module):
    """The CogVLA modules of one PrismaticVLA (`vla.cogvla`); the hooks in `rsd.models.vla` call its methods."""

    def __init__(self, config: VLAConfig, vits: list[nn.Module], num_patches: int) -> None:
        super().__init__()
        cog = config.cogvla
        width = config.llm.hidden_size
        self.config = cog
        self.widths = [vit.embed_dim for vit in vits]
        vit_configs = tuple(v for v in config.vision if isinstance(v, ViTConfig))
        use_vision = cog.aggregation_tokens > 0 or cog.film
        self.vision = CogVision(vits, vit_configs, width, cog.aggregation_tokens, cog.film) if use_vision else None
        self.moe = MoERouter(self.widths, width) if cog.moe else None
        self.tokens_per_image = cog.aggregation_tokens or num_patches
        self.keep = keep_schedule(cog, config.num_images * self.tokens_per_image)
        self.slots = {layer: slot for slot, layer in enumerate(cog.lfp_layers)}
        self.lfp = nn.ModuleDict({str(layer): LFPRouter(width) for layer in cog.lfp_layers}) if cog.lfp_layers else None
        self.action_offsets = nn.Parameter(torch.zeros(cog.action_tokens, width)) if cog.action_tokens else None

    def visual_tokens(self, backbone: nn.Module, projector: nn.Module | None, pixels: torch.Tensor, prompt: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
        """Visual tokens `[B, T, D]` of pixel values `[B, 3 * ViTs, S, S]`, with each image's prompt embeddings `[B, L, D]` and mask `[B, L]`."""
        condition = instruction_condition(prompt, mask)
        if self.vision is None:
            features = backbone(pixels, prompt, mask)
        else:
            features = torch.cat(self.vision(backbone.featurizers(), pixels, condition), dim=-1)
        if self.moe is not None:
            return self.moe(features.split(self.widths, dim=-1), condition)
        return projector(features)

    def pruning(self, prompt: torch.Tensor, mask: torch.Tensor, visual: int) -> PruneState | None:
        """The LFP state at layer 0 for prompt embeddings `[B, L, D]` (mask `[B, L]`) and `visual` tokens; None without LFP."""
        return None if self.lfp is None else PruneState(instruction_condition(prompt, mask), visual)

    def prune(self, state: SegmentState, layer: int) -> SegmentState:
        """The state about to enter `layer`, with only its kept visual tokens if `layer` routes (else unchanged)."""
        slot = self.slots.get(layer)
        pruning = state.pruning
        if slot is None or pruning is None:
            return state
        hidden = state.hidden
        start, count, keep = VISUAL_START, pruning.visual, self.keep[slot]
        scores = self.lfp[str(layer)](hidden[:, start : start + count], pruning.condition)  # [B, count]
        if self.training:
            _check_finite(scores, f"LFP router before layer {layer}")
        top = scores.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values  # [B, keep] kept visual tokens, in order
        batch, length = hidden.shape[:2]
        device = hidden.device
        kept = torch.cat([torch.arange(start, device=device).expand(batch, -1), top + start,
                          torch.arange(start + count, length, device=device).expand(batch, -1)], dim=1)  # [B, S']
        hidden = hidden.gather(1, kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        if torch.is_grad_enabled():
            gate = torch.sigmoid(scores.gather(1, top))
            gate = (1.0 + (gate - gate.detach())).to(hidden.dtype).unsqueeze(-1)  # exactly 1; the router's gradient path
            hidden = torch.cat([hidden[:, :start], hidden[:, start : start + keep] * gate, hidden[:, start + keep :]], dim=1)
        mask = state.attention_mask
        heads, size = mask.shape[1], kept.shape[1]
        mask = mask.gather(2, kept[:, None, :, None].expand(-1, heads, -1, length))
        mask = mask.gather(3, kept[:, None, None, :].expand(-1, heads, size, -1))
        cos, sin = state.position_embeddings
        rows = kept.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
        readout = torch.where(state.readout >= start + count, state.readout - (count - keep), state.readout)
        return dataclasses.replace(state, hidden=hidden, attention_mask=mask, position_ids=state.position_ids.gather(1, kept),
                                   position_embeddings=(cos.gather(1, rows), sin.gather(1, rows)), readout=readout,
                                   pruning=dataclasses.replace(pruning, visual=keep))

    def action_block(self, query: torch.Tensor) -> torch.Tensor:
        """CAtten's action tokens `[B, A, D]` from the query `[B, 1, D]` (the query itself without CAtten)."""
        return query if self.action_offsets is None else query + self.action_offsets.to(query.dtype)
