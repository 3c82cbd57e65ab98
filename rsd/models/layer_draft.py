"""Layer-sampled drafts: a few of the target's own decoder layers, with trainable transitions, as a speculative draft.

The draft runs the target's layers at sampled indices (the seed's `(0, 5, 11, 16, 22, 27)` of Qwen3-0.6B's 28),
sharing the embeddings, final norm and LM head with the target (never copied, never trained). The sampled layers are
either shared and frozen too, or (`tune_layers`) held as copies that start as the target's and are fine-tuned.
Where layers are skipped, a small trainable *transition* (`h + up(silu(down(norm(h))))`, `up` starting at zero)
stands in for them, so an untrained draft is exactly the target with those layers skipped. The
*knowledge-enhanced* variant adds a gated cross-attention (Flamingo-style `tanh(gate)`, gate starting at 0) over a
memory precomputed once from given texts: the target's final hidden states of those texts, turned into keys and
values once (`LayerDraft.set_knowledge`) and reused for every drafted token.

The draft's own state is small: `layer_draft.safetensors` holds only transitions, cross-attention and tuned layer
copies, and the draft is rebuilt from `layer_draft.json` around the target model it was trained for.

Usage:
    draft = LayerDraft(LayerDraftConfig.for_target(qwen3, layers=evenly_spaced_layers(28, 6)), qwen3)
    draft.set_knowledge(build_knowledge_memory(qwen3, [ids_a, ids_b]))         # knowledge-enhanced only
    decoder = SpeculativeDecoder(LayerDraftLM(draft), HFCausalLM(qwen3), gamma=5)      # rsd.runtime.decoding
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache

from rsd.config import from_dict, to_dict
from rsd.errors import CheckpointError, ConfigError, ShapeError
from rsd.io import load_artifact, load_strict, save_artifact

DRAFT_FILE = "layer_draft"


def evenly_spaced_layers(num_layers: int, count: int) -> tuple[int, ...]:
    """`count` layer indices spread evenly over `0 .. num_layers-1`, first and last included (28, 6 → the seed's set)."""
    if not 1 <= count <= num_layers:
        raise ConfigError(f"layers: expected a count in 1..{num_layers}, got {count}.")
    return tuple(sorted({int(round(x)) for x in np.linspace(0, num_layers - 1, count)}))


@dataclass(frozen=True)
class LayerDraftConfig:
    """Which target layers the draft runs and what it adds around them."""

    layers: tuple[int, ...]  # target layer indices, strictly increasing (the seed: (0, 5, 11, 16, 22, 27) of 28)
    target_layers: int  # N, the target's decoder layers
    hidden_size: int  # D, the target's width
    rms_norm_eps: float = 1e-6  # epsilon of the transitions' and cross-attention's RMSNorm
    transition_size: int = 64  # bottleneck width of each transition (0: skipped layers are simply skipped)
    tune_layers: bool = False  # hold trainable copies of the sampled layers (False: share the target's, frozen)
    knowledge: bool = False  # add the gated cross-attention over a knowledge memory
    knowledge_after: int | None = None  # position in `layers` after which it runs (None: the middle)
    knowledge_heads: int = 4  # attention heads of the cross-attention
    token_offset: int = 0  # first vocabulary id the draft predicts (OpenVLA's action mode: vocab - 256)
    vocab_size: int = 0  # ids it predicts from token_offset on (0: the rest of the target's vocabulary)

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if not layers or any(not isinstance(i, int) for i in layers) or list(layers) != sorted(set(layers)):
            raise ConfigError(f"LayerDraftConfig.layers: expected strictly increasing layer indices, got {self.layers!r}.")
        if layers[0] < 0 or layers[-1] >= self.target_layers:
            raise ConfigError(f"LayerDraftConfig.layers: expected indices in 0..{self.target_layers - 1}, got {self.layers!r}.")
        if self.transition_size < 0:
            raise ConfigError(f"LayerDraftConfig.transition_size: expected an int >= 0, got {self.transition_size}.")
        if self.knowledge_after is not None and not 0 <= self.knowledge_after < len(layers):
            raise ConfigError(f"LayerDraftConfig.knowledge_after: expected a position in 0..{len(layers) - 1}, got {self.knowledge_after}.")
        if self.knowledge and self.hidden_size % self.knowledge_heads:
            raise ConfigError(f"LayerDraftConfig.knowledge_heads: expected a divisor of hidden_size {self.hidden_size}, got {self.knowledge_heads}.")
        if self.token_offset < 0 or self.vocab_size < 0:
            raise ConfigError(f"LayerDraftConfig.token_offset/vocab_size: expected ints >= 0, got {self.token_offset}, {self.vocab_size}.")

    @classmethod
    def for_target(cls, target: nn.Module, layers: Sequence[int], **options: Any) -> LayerDraftConfig:
        """The config of a draft over transformers `*ForCausalLM` `target` running `layers`."""
        config = target.config
        return cls(layers=tuple(int(i) for i in layers), target_layers=int(config.num_hidden_layers), hidden_size=int(config.hidden_size),
                   rms_norm_eps=float(config.rms_norm_eps), **options)

    @property
    def cross_attention_position(self) -> int:
        """Position in `layers` after which the cross-attention runs."""
        return len(self.layers) // 2 - 1 if self.knowledge_after is None else self.knowledge_after

    def gaps(self) -> list[int]:
        """Target layers skipped after each sampled layer (to the next one, or to the end)."""
        ends = [*self.layers[1:], self.target_layers]
        return [end - start - 1 for start, end in zip(self.layers, ends, strict=True)]


class Transition(nn.Module):
    """`h + up(silu(down(norm(h))))` in place of skipped layers; `up` starts at zero, so it starts as the identity."""

    def __init__(self, hidden_size: int, width: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.down = nn.Linear(hidden_size, width, bias=False)
        self.up = nn.Linear(width, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[B, S, D]` → `[B, S, D]`."""
        return hidden + self.up(F.silu(self.down(self.norm(hidden))))


class GatedCrossAttention(nn.Module):
    """Cross-attention from the draft's stream to a memory `[M, D]`, scaled by `tanh(gate)` (gate starts at 0)."""

    def __init__(self, hidden_size: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.memory_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, D]` → `[B, H, T, D/H]`."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The knowledge KV cache: keys and values `[B, H, M, D/H]` of memory `[B, M, D]`."""
        memory = self.memory_norm(memory)
        return self._split(self.k_proj(memory)), self._split(self.v_proj(memory))

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`hidden [B, S, D]` plus the gated attention read of the memory's keys/values `[B or 1, H, M, D/H]`."""
        query = self._split(self.q_proj(self.norm(hidden)))
        read = F.scaled_dot_product_attention(query, keys.expand(query.shape[0], -1, -1, -1), values.expand(query.shape[0], -1, -1, -1))
        return hidden + torch.tanh(self.gate) * self.o_proj(read.transpose(1, 2).flatten(-2))


class LayerDraft(nn.Module):
    """The target's sampled layers with transitions (and the knowledge cross-attention): tokens → draft logits."""

    def __init__(self, config: LayerDraftConfig, target: nn.Module) -> None:
        super().__init__()
        base = target.get_decoder()
        if config.target_layers != len(base.layers) or config.hidden_size != target.config.hidden_size:
            raise ShapeError(f"LayerDraft: expected a target with {config.target_layers} layers of width {config.hidden_size}, "
                             f"got {len(base.layers)} of width {target.config.hidden_size}.")
        full_vocab = int(target.get_output_embeddings().weight.shape[0])
        if config.token_offset + config.vocab_size > full_vocab or config.token_offset >= full_vocab:
            raise ShapeError(f"LayerDraft: expected a vocabulary slice inside the target's {full_vocab} ids, got offset {config.token_offset} "
                             f"size {config.vocab_size}.")
        self.config = config
        self._target = (target,)  # a tuple keeps the shared target out of this module's parameters and state dict
        # tuned copies start as the target's own layers (same attention layer_idx: the draft's cache has a slot per target layer)
        self.layers = nn.ModuleList([copy.deepcopy(base.layers[i]) for i in config.layers]).requires_grad_(True) if config.tune_layers else None
        width, eps = config.transition_size, config.rms_norm_eps
        self.entry = Transition(config.hidden_size, width, eps) if width and config.layers[0] > 0 else None
        self.transitions = nn.ModuleList(
            [Transition(config.hidden_size, width, eps) if width and gap else nn.Identity() for gap in config.gaps()]
        )
        self.cross_attention = GatedCrossAttention(config.hidden_size, config.knowledge_heads, eps) if config.knowledge else None
        self._knowledge: tuple[torch.Tensor, torch.Tensor] | None = None
        parameter = next(target.parameters())
        self.to(parameter.device, parameter.dtype)

    @property
    def target(self) -> nn.Module:
        """The target `*ForCausalLM` whose layers, embeddings and head this draft shares."""
        return self._target[0]

    @property
    def draft_layers(self) -> list[nn.Module]:
        """The decoder layers the draft runs, in order: its tuned copies, or the target's own layers."""
        if self.layers is not None:
            return list(self.layers)
        layers = self.target.get_decoder().layers
        return [layers[i] for i in self.config.layers]

    @property
    def vocab_size(self) -> int:
        """V: the ids the draft predicts."""
        full = int(self.target.get_output_embeddings().weight.shape[0])
        return self.config.vocab_size or full - self.config.token_offset

    def head_weight(self) -> torch.Tensor:
        """The rows of the target's LM head for the predicted ids `[V, D]`."""
        weight = self.target.get_output_embeddings().weight
        return weight[self.config.token_offset : self.config.token_offset + self.vocab_size]

    def set_knowledge(self, memory: torch.Tensor | None) -> None:
        """Precompute the knowledge KV cache from memory `[M, D]` or `[B, M, D]` (None clears it)."""
        if memory is None:
            self._knowledge = None
            return
        if self.cross_attention is None:
            raise ConfigError("LayerDraft.set_knowledge: this draft has no cross-attention (config.knowledge is false).")
        memory = memory.unsqueeze(0) if memory.ndim == 2 else memory
        if memory.ndim != 3 or memory.shape[-1] != self.config.hidden_size or memory.shape[1] == 0:
            raise ShapeError(f"LayerDraft.set_knowledge: expected memory [M, {self.config.hidden_size}] with M > 0, got {tuple(memory.shape)}.")
        with torch.no_grad():  # a cache for inference: training computes keys and values per batch instead
            self._knowledge = self.cross_attention.keys_values(memory)

    def hidden(self, embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               cache: Cache | None = None, knowledge: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Final-norm hidden states `[B, S, D]` of embeddings `[B, S, D]` at `position_ids [B, S]`.

        `attention_mask` is what the target's layers take (None: causal over the sequence and any cached positions
        when S == 1; a bool `[B, 1, S, K]` or additive float mask otherwise); `knowledge` (keys, values) overrides the
        stored knowledge KV cache (training computes it per batch).
        """
        base = self.target.get_decoder()
        if self.cross_attention is not None:
            knowledge = knowledge if knowledge is not None else self._knowledge
            if knowledge is None:
                raise ConfigError("LayerDraft: this draft is knowledge-enhanced; call set_knowledge(memory) first.")
        position_embeddings = base.rotary_emb(embeds, position_ids)
        hidden = embeds if self.entry is None else self.entry(embeds)
        after = self.config.cross_attention_position
        for position, (layer, transition) in enumerate(zip(self.draft_layers, self.transitions, strict=True)):
            hidden = layer(hidden, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=cache is not None,
                           position_embeddings=position_embeddings)
            hidden = transition(hidden)
            if self.cross_attention is not None and position == after:
                hidden = self.cross_attention(hidden, *knowledge)
        return base.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits `[..., V]` from final-norm hidden states `[..., D]` through the target's (sliced) head."""
        return F.linear(hidden, self.head_weight())

    def save(self, directory: str | Path, target_fingerprint: str) -> Path:
        """Write `layer_draft.safetensors` (own weights only) and `layer_draft.json` (config, the target's fingerprint)."""
        return save_artifact(directory, DRAFT_FILE, self.state_dict(), {"config": to_dict(self.config), "target_fingerprint": target_fingerprint},
                             kind="layer_draft")

    @classmethod
    def load(cls, directory: str | Path, target: nn.Module, target_fingerprint: str | None = None) -> LayerDraft:
        """Rebuild a saved draft around `target`; a different target fingerprint (when given) is an error."""
        tensors, meta = load_artifact(directory, DRAFT_FILE, kind="layer_draft")
        if target_fingerprint is not None and meta["target_fingerprint"] != target_fingerprint:
            raise CheckpointError(f"{directory}: expected a draft trained for target {target_fingerprint[:12]}…, "
                                  f"got one for {str(meta['target_fingerprint'])[:12]}…; train a draft for this target.")
        draft = cls(from_dict(LayerDraftConfig, meta["config"]), target)
        parameter = next(target.parameters())
        load_strict(draft, {k: v.to(parameter.device, parameter.dtype) for k, v in tensors.items()}, Path(directory) / f"{DRAFT_FILE}.safetensors")
        return draft.eval()


def causal_mask(past: int, length: int, device: torch.device) -> torch.Tensor:
    """Bool mask `[1, 1, T, past + T]`: new position t sees every cached position and new positions up to t."""
    keys = torch.arange(past + length, device=device)
    return (keys.unsqueeze(0) <= past + torch.arange(length, device=device).unsqueeze(1)).view(1, 1, length, past + length)


@torch.inference_mode()
def build_knowledge_memory(target: nn.Module, texts: Sequence[torch.Tensor], max_tokens: int = 2048, chunk: int = 512) -> torch.Tensor:
    """The knowledge memory `[M, D]`: the target's final hidden states over token ids of `texts` (each `[S]`), at most `max_tokens`."""
    base = target.get_decoder()
    device = next(target.parameters()).device
    parts, total = [], 0
    for text in texts:
        if text.ndim != 1:
            raise ShapeError(f"build_knowledge_memory: expected token ids [S] per text, got {tuple(text.shape)}.")
        for start in range(0, text.shape[0], chunk):
            if total >= max_tokens:
                break
            piece = text[start : start + min(chunk, max_tokens - total)].to(device)
            parts.append(base(input_ids=piece.unsqueeze(0)).last_hidden_state[0])
            total += piece.shape[0]
    if not parts:
        raise ShapeError("build_knowledge_memory: expected at least one non-empty text, got none.")
    return torch.cat(parts)
