"""Frozen dataclass configs and their JSON round trip (the named presets are in `rsd.presets`).

Usage:
    from rsd.config import TokenizerConfig, load_json, save_json
    save_json(TokenizerConfig(levels=5), "tokenizer.json"); config = load_json(TokenizerConfig, "tokenizer.json")

Every config validates itself in `__post_init__`; `to_dict` / `from_dict` round-trip through JSON and
`from_dict` refuses unknown keys. Artifacts store the config they were built from, and models are rebuilt
from that JSON, never from code defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rsd.errors import ConfigError

T = TypeVar("T")


def _check(condition: bool, cls: str, name: str, allowed: str, got: object) -> None:
    """Raise a ConfigError naming the field, the allowed values and what arrived."""
    if not condition:
        raise ConfigError(f"{cls}.{name}: expected {allowed}, got {got!r}.")


def _positive(cls: object, *names: str) -> None:
    """Check that every named integer field of `cls` is a positive int."""
    for name in names:
        value = getattr(cls, name)
        _check(isinstance(value, int) and value > 0, type(cls).__name__, name, "a positive int", value)


@dataclass(frozen=True)
class TokenizerConfig:
    """Shape of the RFSQ action tokenizer (docs/architecture.md, "The early-exit design")."""

    chunk_len: int = 8  # H: steps per action chunk
    action_dim: int = 7  # A: xyz delta, rotation delta, gripper
    latent_dim: int = 16  # d: latent scalars per step
    num_layers: int = 8  # L: residual FSQ layers
    levels: int = 7  # V: levels per scalar (odd, so the zero level exists)
    coarse_layers: int = 3  # C: layers the draft predicts
    mlp_hidden: int = 64  # width of the per-step encoder/decoder MLPs
    learnable_scales: bool = False  # learn per-layer scales instead of the fixed geometric ones

    def __post_init__(self) -> None:
        _positive(self, "chunk_len", "action_dim", "latent_dim", "num_layers", "levels", "coarse_layers", "mlp_hidden")
        _check(self.levels % 2 == 1 and self.levels >= 3, "TokenizerConfig", "levels", "an odd int >= 3", self.levels)
        _check(
            self.coarse_layers <= self.num_layers,
            "TokenizerConfig",
            "coarse_layers",
            f"at most num_layers={self.num_layers}",
            self.coarse_layers,
        )

    @property
    def tokens_per_layer(self) -> int:
        """Tokens in one residual layer of a chunk: H * d."""
        return self.chunk_len * self.latent_dim

    @property
    def zero_level(self) -> int:
        """Index of the level whose value is 0."""
        return (self.levels - 1) // 2


@dataclass(frozen=True)
class ViTConfig:
    """One timm vision backbone; `None` overrides keep the timm architecture's own value."""

    timm_name: str  # timm architecture name, e.g. vit_so400m_patch14_siglip_224
    img_size: int = 224  # input side in pixels
    patch_size: int | None = None  # override of the architecture's patch size (tiny preset)
    embed_dim: int | None = None  # override of the width
    depth: int | None = None  # override of the number of blocks
    num_heads: int | None = None  # override of the attention heads
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalisation mean
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalisation std
    feature_layer: int = -2  # block whose patch tokens are used (OpenVLA: second to last)

    def __post_init__(self) -> None:
        _check(bool(self.timm_name), "ViTConfig", "timm_name", "a timm model name", self.timm_name)
        _positive(self, "img_size")
        _check(len(self.mean) == 3 and len(self.std) == 3, "ViTConfig", "mean/std", "3 values each", (self.mean, self.std))
        _check(all(s > 0 for s in self.std), "ViTConfig", "std", "positive values", self.std)


@dataclass(frozen=True)
class LLMConfig:
    """Llama decoder dimensions (transformers' LlamaConfig fields of the same meaning)."""

    hidden_size: int = 4096  # width of the residual stream
    num_layers: int = 32  # decoder layers N
    num_heads: int = 32  # attention heads
    num_kv_heads: int = 32  # key/value heads (grouped-query attention when fewer)
    intermediate_size: int = 11008  # MLP width
    vocab_size: int = 32064  # embedding rows (OpenVLA pads Llama-2's 32000 to 32064)
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # rotary base
    max_position_embeddings: int = 2048  # longest sequence
    initializer_range: float = 0.02  # std of the normal init of new weights (Llama's 0.02 suits widths near 4096)

    def __post_init__(self) -> None:
        _positive(self, "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")
        _check(self.initializer_range > 0, "LLMConfig", "initializer_range", "a positive float", self.initializer_range)
        _check(self.hidden_size % self.num_heads == 0, "LLMConfig", "num_heads", "a divisor of hidden_size", self.num_heads)
        _check(
            self.num_heads % self.num_kv_heads == 0, "LLMConfig", "num_kv_heads", "a divisor of num_heads", self.num_kv_heads
        )


CONV_TOKENS = ("keypoints", "grid")
FILM_VALUES = ("words+positions", "words", "slots")  # what the FiLM summary's attention averages, or "slots": no attention


@dataclass(frozen=True)
class ConvConfig:
    """A small GroupNorm conv backbone trained from scratch (robomimic-style), an alternative to a timm ViT.

    It emits either spatial-softmax keypoint tokens (one per keypoint map: expected x, y, their Fourier features,
    the expected activation and a learned identity) or the tokens of a pooled feature grid with their coordinates.
    """

    img_size: int = 64  # input side in pixels
    channels: tuple[int, ...] = (16, 32, 32, 64)  # conv widths of the four 3×3 stages, strides 2, 2, 1, 1
    tokens: str = "keypoints"  # "keypoints" (spatial softmax) or "grid" (pooled feature map)
    num_keypoints: int = 16  # keypoint tokens (tokens="keypoints")
    grid_size: int = 8  # side of the pooled grid (tokens="grid")
    fourier_bands: int = 6  # sin/cos frequencies of the coordinate features
    film: bool = True  # FiLM: every conv stage scaled and shifted by a linear map of an order-aware instruction summary
    film_queries: int = 2  # learned queries of that summary (each attends over the instruction's words and positions), or slots
    film_values: str = "words+positions"  # what the summary averages: "words+positions" (before 2026-11-26) or "words";
    # "slots": no attention, query g is the g-th word itself (zeros past the instruction's end; words past film_queries unseen)
    groups: int = 8  # GroupNorm groups
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalisation mean
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalisation std

    def __post_init__(self) -> None:
        _positive(self, "img_size", "num_keypoints", "grid_size", "fourier_bands", "groups", "film_queries")
        _check(len(self.channels) == 4 and all(isinstance(c, int) and c > 0 and c % self.groups == 0 for c in self.channels),
               "ConvConfig", "channels", f"4 positive widths divisible by groups={self.groups}", self.channels)
        _check(self.tokens in CONV_TOKENS, "ConvConfig", "tokens", f"one of {list(CONV_TOKENS)}", self.tokens)
        _check(self.film_values in FILM_VALUES, "ConvConfig", "film_values", f"one of {list(FILM_VALUES)}", self.film_values)
        _check(self.img_size % 4 == 0, "ConvConfig", "img_size", "a multiple of 4 (two stride-2 stages)", self.img_size)
        _check(len(self.mean) == 3 and len(self.std) == 3, "ConvConfig", "mean/std", "3 values each", (self.mean, self.std))
        _check(all(s > 0 for s in self.std), "ConvConfig", "std", "positive values", self.std)


VisionConfig = ViTConfig | ConvConfig


@dataclass(frozen=True)
class CogVLAConfig:
    """CogVLA's efficiency modules (seed 003; `rsd.models.cogvla`), each off by default and usable alone."""

    aggregation_tokens: int = 0  # learned tokens appended inside each ViT whose outputs replace its patches (0: off; CogVLA: 64 of 256)
    film: bool = False  # FiLM inside the ViTs: every block's output scaled and shifted by a map of the mean instruction embedding
    moe: bool = False  # the two ViTs' tokens projected apart and mixed by softmax(MLP(mean instruction embedding)) (replaces the projector)
    lfp_layers: tuple[int, ...] = ()  # LLM layers before which an instruction-FiLMed router keeps the top visual tokens (CogVLA: 5, 10, ..., 30)
    lfp_keep: tuple[float, float] = (0.85, 0.15)  # shifted-cosine keep ratio of the visual tokens, first routing layer to last
    action_tokens: int = 0  # CAtten: the rsd query becomes this many action tokens that attend to each other bidirectionally (0: off)

    def __post_init__(self) -> None:
        _check(isinstance(self.aggregation_tokens, int) and self.aggregation_tokens >= 0, "CogVLAConfig", "aggregation_tokens",
               "an int >= 0", self.aggregation_tokens)
        layers = self.lfp_layers
        _check(all(isinstance(i, int) and i >= 0 for i in layers) and list(layers) == sorted(set(layers)), "CogVLAConfig", "lfp_layers",
               "strictly increasing layer indices >= 0", layers)
        high, low = self.lfp_keep
        _check(0.0 < low <= high <= 1.0, "CogVLAConfig", "lfp_keep", "(first, last) keep ratios with 0 < last <= first <= 1", self.lfp_keep)
        _check(isinstance(self.action_tokens, int) and self.action_tokens >= 0 and self.action_tokens != 1, "CogVLAConfig",
               "action_tokens", "0 (one causal query) or an int >= 2", self.action_tokens)

    @property
    def enabled(self) -> bool:
        """Whether any module is on."""
        return bool(self.aggregation_tokens or self.film or self.moe or self.lfp_layers or self.action_tokens)


LAYOUTS = ("rsd", "openvla", "oft")
OFT_ATTENTION = ("full", "action_block")


@dataclass(frozen=True)
class VLAConfig:
    """The main model: vision backbones -> projector -> Llama, with the RFSQ head's token shape."""

    vision: tuple[ViTConfig | ConvConfig, ...]  # backbones whose per-token features are concatenated per token
    llm: LLMConfig  # the language model
    tokenizer: TokenizerConfig  # action token shape the RFSQ head predicts
    num_images: int = 1  # cameras per observation
    proprio_dim: int = 0  # proprioceptive input size (0: no proprio token)
    text_tokenizer: str = "word"  # "word" or "byte" (built in, offline), or a local path to a Llama tokenizer
    prompt_template: str = "In: What action should the robot take to {instruction}?\nOut:"  # OpenVLA prompt
    resize_images: bool = False  # resize images of another size to the backbone size (else an error)
    exit_layer: int | None = None  # default early-exit layer k (None: num_layers // 2)
    layout: str = "rsd"  # sequence layout: "rsd" (learned query token), "openvla" (last prompt position), "oft" (action block)
    num_action_tokens: int = 56  # oft: zero-embedding placeholder tokens (OFT: chunk 8 x 7 dims), all read by the L1 head
    oft_attention: str = "full"  # oft: "full" (every real token sees every other, OFT's released code) or "action_block"
    prompt_end_id: int = 29871  # openvla/oft: id appended after the prompt (Llama-2's empty "▁" token, as OpenVLA does)
    stop_id: int = 2  # oft: the `</s>` id that closes the sequence after the action block
    query_summary: bool = False  # rsd layout: the action query starts from a linear summary of all visual tokens (small models learn far faster)
    center_crop: bool = False  # crop the central 90 % of the image area and resize back (models trained with crop augmentation)
    cogvla: CogVLAConfig = CogVLAConfig()  # CogVLA's efficiency modules (all off: OpenVLA's shapes)

    def __post_init__(self) -> None:
        _check(len(self.vision) >= 1, "VLAConfig", "vision", "at least one ViTConfig or ConvConfig", self.vision)
        convs = [v for v in self.vision if isinstance(v, ConvConfig)]
        _check(not convs or len(self.vision) == 1, "VLAConfig", "vision", "a ConvConfig alone (it is not fused with a ViT)", self.vision)
        sizes = {v.img_size for v in self.vision}
        _check(len(sizes) == 1, "VLAConfig", "vision", "backbones of one image size", sorted(sizes))
        _positive(self, "num_images")
        _check(self.proprio_dim >= 0, "VLAConfig", "proprio_dim", "an int >= 0", self.proprio_dim)
        _check("{instruction}" in self.prompt_template, "VLAConfig", "prompt_template", "a '{instruction}' field", self.prompt_template)
        _check(self.layout in LAYOUTS, "VLAConfig", "layout", f"one of {list(LAYOUTS)}", self.layout)
        _positive(self, "num_action_tokens")
        _check(self.oft_attention in OFT_ATTENTION, "VLAConfig", "oft_attention", f"one of {list(OFT_ATTENTION)}", self.oft_attention)
        if self.layout != "rsd":
            vocab = self.llm.vocab_size
            _check(0 <= self.prompt_end_id < vocab, "VLAConfig", "prompt_end_id", f"a token id in 0..{vocab - 1}", self.prompt_end_id)
            _check(0 <= self.stop_id < vocab, "VLAConfig", "stop_id", f"a token id in 0..{vocab - 1}", self.stop_id)
        _check(not self.query_summary or self.layout == "rsd", "VLAConfig", "query_summary", "False unless layout is 'rsd'", self.query_summary)
        if self.layout == "openvla":
            _check(self.proprio_dim == 0, "VLAConfig", "proprio_dim", "0 for the openvla layout (OpenVLA takes no proprio)", self.proprio_dim)
        cog = self.cogvla
        vits = [v for v in self.vision if isinstance(v, ViTConfig)]
        _check(not (cog.aggregation_tokens or cog.film) or not convs, "VLAConfig", "cogvla",
               "aggregation tokens and FiLM on ViT backbones only (the conv backbone has its own ConvConfig.film)", cog)
        _check(not cog.moe or len(vits) == 2, "VLAConfig", "cogvla.moe", "True only with two ViT backbones (the router mixes two experts)", cog.moe)
        _check(all(i < self.llm.num_layers for i in cog.lfp_layers), "VLAConfig", "cogvla.lfp_layers",
               f"layer indices below num_layers={self.llm.num_layers}", cog.lfp_layers)
        _check(not cog.action_tokens or self.layout == "rsd", "VLAConfig", "cogvla.action_tokens",
               "0 unless layout is 'rsd' (the oft layout has its own action block: oft_attention='action_block')", cog.action_tokens)
        if self.exit_layer is not None:
            _check(
                0 <= self.exit_layer <= self.llm.num_layers,
                "VLAConfig",
                "exit_layer",
                f"an int in 0..{self.llm.num_layers}",
                self.exit_layer,
            )

    @property
    def image_size(self) -> int:
        """Side of the square images the backbones take."""
        return self.vision[0].img_size

    @property
    def default_exit_layer(self) -> int:
        """The exit layer k used when none is given: the configured one, else N/2."""
        return self.exit_layer if self.exit_layer is not None else self.llm.num_layers // 2


@dataclass(frozen=True)
class DraftConfig:
    """The draft head: exit-layer hidden -> coarse RFSQ logits (docs/architecture.md, "The early-exit design", step 3)."""

    hidden_size: int  # width of the main model's hidden state it reads
    exit_layer: int  # the main model's layer k whose output it reads
    tokenizer: TokenizerConfig  # token shape (C coarse layers of H*d tokens with V levels)
    width: int = 512  # projection width
    num_heads: int = 8  # attention heads of the decoder layer
    ffn_size: int = 2048  # feed-forward width of the decoder layer
    dropout: float = 0.0  # dropout inside the decoder layer while training

    def __post_init__(self) -> None:
        _positive(self, "hidden_size", "width", "num_heads", "ffn_size")
        _check(self.exit_layer >= 0, "DraftConfig", "exit_layer", "an int >= 0", self.exit_layer)
        _check(self.width % self.num_heads == 0, "DraftConfig", "num_heads", "a divisor of width", self.num_heads)
        _check(0.0 <= self.dropout < 1.0, "DraftConfig", "dropout", "a float in [0, 1)", self.dropout)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by the training steps."""

    epochs: int = 20  # passes over the training split
    batch_size: int = 64  # examples per step
    lr: float = 1e-3  # AdamW peak learning rate (cosine schedule)
    warmup: float = 0.05  # share of the steps spent warming up to the peak rate
    weight_decay: float = 0.01  # AdamW weight decay
    val_fraction: float = 0.1  # share of episodes held out for validation
    seed: int = 0  # seeds the split, the initialisation and the shuffling

    def __post_init__(self) -> None:
        _positive(self, "epochs", "batch_size")
        _check(self.lr > 0, "TrainConfig", "lr", "a positive float", self.lr)
        _check(0.0 <= self.warmup < 1.0, "TrainConfig", "warmup", "a float in [0, 1)", self.warmup)
        _check(0.0 < self.val_fraction < 1.0, "TrainConfig", "val_fraction", "a float in (0, 1)", self.val_fraction)


@dataclass(frozen=True)
class AdapterConfig:
    """LoRA adapters (peft) on the LLM's linear layers for fine-tuning a trained main model (`rsd.models.lora`)."""

    rank: int = 32  # LoRA rank r (CogVLA: 32)
    alpha: float = 16.0  # LoRA alpha; the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input while training

    def __post_init__(self) -> None:
        _positive(self, "rank")
        _check(self.alpha > 0, "AdapterConfig", "alpha", "a positive float", self.alpha)
        _check(0.0 <= self.dropout < 1.0, "AdapterConfig", "dropout", "a float in [0, 1)", self.dropout)


SELECT_BY = ("rollouts", "val_l1")


@dataclass(frozen=True)
class PolicyTrainConfig:
    """What train-policy does besides optimisation: image augmentation and how the kept epoch is chosen."""

    shift: int = 4  # DrQ random-shift augmentation: frames shifted by up to this many pixels (0: off)
    select_by: str = "rollouts"  # keep the epoch by closed-loop success ("rollouts", see select_alpha) or the lowest validation L1 ("val_l1")
    select_alpha: float = 0.05  # "rollouts": a later evaluated epoch replaces the kept one unless the kept one succeeded on significantly
    # more of the same selection seeds (one-sided exact sign test on the seeds where they differ, p < select_alpha); 0: the last evaluated epoch
    rollout_every: int = 1  # epochs between closed-loop evaluations (the last epoch is always evaluated)
    rollout_episodes: int = 20  # episodes per closed-loop evaluation
    rollout_seed: int = 5000  # first seed of the selection episodes (demonstrations use 0.., `rsd eval` 10000..)
    rollout_replan_every: int | None = None  # steps of each chunk the selection rollouts execute before replanning (None: all)
    rollout_batch: int = 1  # selection episodes played side by side, one env each, their chunks predicted in one batch (same outcomes)
    ema_decay: float = 0.0  # decay of the weights' moving average that is validated, rolled out and saved (0: the last step's weights)
    object_loss: float = 0.0  # weight of the auxiliary regression of the recorded object state (obs/object) from the query hidden (0: off)
    compile: bool = False  # torch.compile the LLM's decoder layers for training at one static shape (full batches, prompts padded):
    # fused kernels, the same model; on a CPU inductor needs a C++ compiler and Python.h (20-30 s there the first time, then cached)

    def __post_init__(self) -> None:
        _check(isinstance(self.compile, bool), "PolicyTrainConfig", "compile", "a bool", self.compile)
        _check(isinstance(self.object_loss, (int, float)) and not isinstance(self.object_loss, bool) and self.object_loss >= 0.0,
               "PolicyTrainConfig", "object_loss", "a float >= 0", self.object_loss)
        _check(isinstance(self.ema_decay, float) and 0.0 <= self.ema_decay < 1.0, "PolicyTrainConfig", "ema_decay", "a float in [0, 1)",
               self.ema_decay)
        _check(isinstance(self.shift, int) and self.shift >= 0, "PolicyTrainConfig", "shift", "an int >= 0", self.shift)
        _check(self.select_by in SELECT_BY, "PolicyTrainConfig", "select_by", f"one of {list(SELECT_BY)}", self.select_by)
        _check(isinstance(self.select_alpha, float) and 0.0 <= self.select_alpha < 0.5, "PolicyTrainConfig", "select_alpha",
               "a float in [0, 0.5)", self.select_alpha)
        _positive(self, "rollout_every", "rollout_episodes", "rollout_batch")
        _check(isinstance(self.rollout_seed, int) and self.rollout_seed >= 0, "PolicyTrainConfig", "rollout_seed", "an int >= 0", self.rollout_seed)
        _check(self.rollout_replan_every is None or (isinstance(self.rollout_replan_every, int) and self.rollout_replan_every > 0),
               "PolicyTrainConfig", "rollout_replan_every", "None or an int > 0", self.rollout_replan_every)


@dataclass(frozen=True)
class TextLMConfig:
    """A Qwen3-architecture text LM (transformers' Qwen3Config fields of the same meaning), for speculative decoding work."""

    vocab_size: int = 2048  # byte-level BPE vocabulary (the tokenizer is trained to this size)
    hidden_size: int = 128  # width of the residual stream
    num_layers: int = 28  # decoder layers (Qwen3-0.6B's depth, so the seed's layer set applies)
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (grouped-query attention, as Qwen3)
    head_dim: int = 32  # width of one head
    intermediate_size: int = 384  # MLP width (3x, Qwen3-0.6B's ratio)
    max_position_embeddings: int = 1024  # longest sequence
    rope_theta: float = 1_000_000.0  # Qwen3's rotary base
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "max_position_embeddings")
        _check(self.num_heads % self.num_kv_heads == 0, "TextLMConfig", "num_kv_heads", f"a divisor of num_heads {self.num_heads}",
               self.num_kv_heads)
        _check(self.vocab_size >= 300, "TextLMConfig", "vocab_size", "at least 300 (256 bytes, merges and specials)", self.vocab_size)


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per-channel normalisation of ImageNet-trained ViTs (DINOv2, the tiny ViT)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_dict(config: Any) -> dict[str, Any]:
    """Turn a config dataclass (nested ones too) into JSON-ready plain data."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild config class `cls` from `to_dict` output; unknown or missing keys are a ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        close = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
        hints_text = ", ".join(f"{k!r}" + (f" (did you mean {v[0]!r}?)" if v else "") for k, v in close.items())
        raise ConfigError(f"{cls.__name__}: unknown keys {hints_text}; allowed: {sorted(names)}.")
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise ConfigError(f"{cls.__name__}: missing keys {missing}.")
    kwargs = {name: _convert(hints[name], value, f"{cls.__name__}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        classes = [a for a in args if dataclasses.is_dataclass(a)]
        if len(classes) > 1:
            return from_dict(_union_member(classes, value, where), value)
        return _convert(args[0], value, where)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where) for v in value)
        return tuple(_convert(a, v, where) for a, v in zip(args, value, strict=True))
    return value


def _union_member(classes: list[type], value: Any, where: str) -> type:
    """The one dataclass of a union whose fields hold every key of `value` and whose required fields are present."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {value!r}.")
    fits = []
    for cls in classes:
        fields = dataclasses.fields(cls)
        required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if set(value) <= {f.name for f in fields} and required <= set(value):
            fits.append(cls)
    if len(fits) != 1:
        raise ConfigError(f"{where}: expected the keys of exactly one of {[c.__name__ for c in classes]}, got keys {sorted(value)}.")
    return fits[0]


def save_json(config: Any, path: str | Path) -> None:
    """Write a config dataclass as indented JSON."""
    Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")


def load_json(cls: type[T], path: str | Path) -> T:
    """Read a config dataclass written by `save_json`."""
    return from_dict(cls, json.loads(Path(path).read_text()))


__all__ = [
    "AdapterConfig",
    "CogVLAConfig",
    "ConvConfig",
    "DraftConfig",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LLMConfig",
    "PolicyTrainConfig",
    "TextLMConfig",
    "TokenizerConfig",
    "TrainConfig",
    "ViTConfig",
    "VLAConfig",
    "from_dict",
    "load_json",
    "save_json",
    "to_dict",
]
