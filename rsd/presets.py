"""Named presets: configs that fit together (main model, tokenizer, draft, training defaults).

Usage:
    from rsd.presets import get_preset
    preset = get_preset("tiny")            # or "openvla-7b"
    preset.model.llm.num_layers            # 6

`tiny` runs the whole pipeline on a CPU in minutes (tests and `rsd demo`); `tiny-no-proprio` is the same model
without a proprio input (data without proprio, `--proprio-keys none`); `openvla-7b` has OpenVLA-7B's exact
shapes for latency work with random weights. A typo gets a "did you mean" suggestion. The text LMs of the
speculative-decoding work have their own presets (`get_text_lm_preset("qwen3-tiny")`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from rsd.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConvConfig,
    DraftConfig,
    LLMConfig,
    PolicyTrainConfig,
    TextLMConfig,
    TokenizerConfig,
    TrainConfig,
    ViTConfig,
    VLAConfig,
)
from rsd.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """A named set of configs that fit together: tokenizer, main model, draft and training defaults."""

    name: str  # preset name
    model: VLAConfig  # the main model (its tokenizer field is the tokenizer config)
    draft_width: int  # DraftConfig.width for this preset
    draft_heads: int  # DraftConfig.num_heads
    draft_ffn: int  # DraftConfig.ffn_size
    tokenizer_train: TrainConfig  # defaults of train-tokenizer
    policy_train: TrainConfig  # defaults of train-policy
    draft_train: TrainConfig  # defaults of train-draft
    policy_options: PolicyTrainConfig = PolicyTrainConfig()  # augmentation and epoch selection of train-policy

    @property
    def tokenizer(self) -> TokenizerConfig:
        """The tokenizer config of this preset."""
        return self.model.tokenizer

    def draft(self, exit_layer: int | None = None) -> DraftConfig:
        """The draft config reading this preset's model at `exit_layer` (default N/2)."""
        k = self.model.default_exit_layer if exit_layer is None else exit_layer
        return DraftConfig(
            hidden_size=self.model.llm.hidden_size,
            exit_layer=k,
            tokenizer=self.tokenizer,
            width=self.draft_width,
            num_heads=self.draft_heads,
            ffn_size=self.draft_ffn,
        )


def _tiny(vision: str = "keypoints", proprio_dim: int = 8) -> Preset:
    tokenizer = TokenizerConfig()
    conv = ConvConfig(img_size=64, tokens=vision, film_values="slots", film_queries=16, mean=IMAGENET_MEAN, std=IMAGENET_STD) if vision != "vit" else None
    model = VLAConfig(
        vision=(conv,) if conv else (
            ViTConfig(
                timm_name="vit_tiny_patch16_224",
                img_size=64,
                patch_size=16,
                embed_dim=96,
                depth=2,
                num_heads=3,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                feature_layer=-1,
            ),
        ),
        llm=LLMConfig(  # width 64: a training step costs 0.44x width 128's on a CPU (the LLM was 3/4 of the FLOPs)
            hidden_size=64,
            num_layers=6,
            num_heads=4,
            num_kv_heads=4,
            intermediate_size=172,
            vocab_size=1024,
            max_position_embeddings=512,
            initializer_range=0.1,  # near 1/sqrt(width): with 0.02 attention starts uniform and the query learns to read the image far slower
        ),
        tokenizer=tokenizer,
        proprio_dim=proprio_dim,
        prompt_template="{instruction}",
        query_summary=True,
    )
    return Preset(
        name="tiny",
        model=model,
        draft_width=128,
        draft_heads=4,
        draft_ffn=256,
        tokenizer_train=TrainConfig(epochs=30, batch_size=64, lr=3e-3),
        policy_train=TrainConfig(epochs=15, batch_size=32, lr=1e-3),
        draft_train=TrainConfig(epochs=40, batch_size=128, lr=1e-3),
        # object_loss where the data records obs/object: the policy learns where the named block is far sooner; the selection
        # episodes play side by side (50 of them in 1.9 s against 7.6 s one at a time on 2 cores)
        policy_options=PolicyTrainConfig(object_loss=1.0, rollout_batch=50),
    )


def _openvla_7b() -> Preset:
    tokenizer = TokenizerConfig()
    model = VLAConfig(
        vision=(  # OpenVLA's order ("dinosiglip"): DINOv2 is `featurizer`, SigLIP is `fused_featurizer`
            ViTConfig(timm_name="vit_large_patch14_reg4_dinov2", img_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD),
            ViTConfig(timm_name="vit_so400m_patch14_siglip_224", img_size=224),
        ),
        llm=LLMConfig(),
        tokenizer=tokenizer,
        text_tokenizer="",
        resize_images=True,
    )
    return Preset(
        name="openvla-7b",
        model=model,
        draft_width=512,
        draft_heads=8,
        draft_ffn=2048,
        tokenizer_train=TrainConfig(epochs=50, batch_size=256, lr=1e-3),
        policy_train=TrainConfig(epochs=10, batch_size=16, lr=1e-4),
        draft_train=TrainConfig(epochs=50, batch_size=32, lr=1e-4),
    )


PRESETS = {"tiny": _tiny, "tiny-grid": lambda: _tiny("grid"), "tiny-vit": lambda: _tiny("vit"),
           "tiny-no-proprio": lambda: _tiny(proprio_dim=0), "openvla-7b": _openvla_7b}


def _lookup(kind: str, name: str, table: dict) -> None:
    """Refuse a name missing from `table`, suggesting the closest one."""
    if name not in table:
        close = difflib.get_close_matches(name, table, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{kind}: expected one of {sorted(table)}, got {name!r}.{hint}")


def get_preset(name: str) -> Preset:
    """Return the preset called `name`; a typo gets a "did you mean" suggestion."""
    _lookup("preset", name, PRESETS)
    return PRESETS[name]()


# Text LMs for speculative decoding (`rsd train-text-lm`): `qwen3-tiny` has Qwen3-0.6B's 28 layers at width 128
# (about 5.8 M parameters, the bench model); `qwen3-test` trains in seconds for the tests.
TEXT_LM_PRESETS = {
    "qwen3-tiny": TextLMConfig(),
    "qwen3-test": TextLMConfig(vocab_size=320, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                               max_position_embeddings=256),
}


def get_text_lm_preset(name: str) -> TextLMConfig:
    """Return the text LM config called `name`; a typo gets a "did you mean" suggestion."""
    _lookup("text LM preset", name, TEXT_LM_PRESETS)
    return TEXT_LM_PRESETS[name]



__all__ = ["PRESETS", "TEXT_LM_PRESETS", "Preset", "get_preset", "get_text_lm_preset"]
