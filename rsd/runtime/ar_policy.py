"""The control-loop policy of OpenVLA's autoregressive action mode: plain or speculative decoding of the action tokens.

`ARActionPolicy.act(obs)` validates the observation, builds the prefix (BOS, patches, prompt, prompt-end id) once,
decodes the A action tokens over the model's KV cache (one target pass per token, or draft-then-verify rounds with a
layer-sampled draft), and un-normalises the decoded bins. It has `reset()` and `stats()`, so `rsd.envs.evaluate`
runs it like the chunk policies.

Usage:
    model = ARActionModel.load("runs/ar/policy")
    policy = ARActionPolicy(model, draft=LayerDraft.load("runs/ar/draft", model.vla.language_model), gamma=3)
    action = policy.act({"image": rgb_uint8_hw3, "instruction": "pick up the red block"})
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from rsd.errors import ConfigError
from rsd.models.ar_actions import ARActionModel
from rsd.models.layer_draft import LayerDraft
from rsd.models.processor import observation_batch
from rsd.runtime.decoding import (
    GREEDY,
    DecodeStats,
    HFCausalLM,
    LayerDraftLM,
    SamplingConfig,
    SpeculativeDecoder,
    generate_plain,
)
from rsd.runtime.timing import RollingStats


def action_target(model: ARActionModel) -> HFCausalLM:
    """The model's language model as a decoding target over the action ids only (the last `num_bins` of its vocabulary)."""
    config = model.tokenizer.config
    return HFCausalLM(model.vla.language_model, token_offset=config.token_offset, vocab_size=config.num_bins)


class ARActionPolicy:
    """Observation → one action per step by decoding A action tokens: plainly, or speculatively with a layer draft.

    Greedy by default; with a draft the tokens (hence actions) are exactly those of plain greedy decoding unless
    `sampling.relaxed_distance` > 0 (lossy, Spec-VLA's relaxed acceptance). Not thread-safe: one per control loop.
    """

    def __init__(self, model: ARActionModel, draft: LayerDraft | None = None, gamma: int = 3, sampling: SamplingConfig = GREEDY,
                 seed: int = 0) -> None:
        if draft is not None and draft.target is not model.vla.language_model:
            raise ConfigError("ARActionPolicy: expected a draft built on this model's language model (LayerDraft.load(dir, model.vla.language_model)).")
        self.model = model
        self.target = action_target(model)
        self.decoder = SpeculativeDecoder(LayerDraftLM(draft), self.target, gamma, sampling) if draft is not None else None
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(seed)
        self._stats = RollingStats()
        self._decode = DecodeStats(gamma if draft is not None else 0)
        self._calls = 0

    def predict_tokens(self, obs: dict[str, Any]) -> np.ndarray:
        """The local action tokens `[A]` for one observation."""
        started = time.perf_counter()
        images, instructions, _ = observation_batch(obs, proprio_dim=0)  # OpenVLA's action mode takes no proprio
        with torch.inference_mode():
            prefix = self.model.prefix(self.model.vla.encode_inputs(images, instructions))
        embedded = time.perf_counter()
        steps = self.model.action_dim
        if self.decoder is None:
            result = generate_plain(self.target, prefix, steps, self.sampling, self.generator)
        else:
            result = self.decoder.generate(prefix, steps, self.generator)
        finished = time.perf_counter()
        self._decode.add(result.stats)
        self._calls += 1
        self._stats.add({"prefix": 1e3 * (embedded - started), "decode": 1e3 * (finished - embedded), "total": 1e3 * (finished - started)})
        return np.asarray(result.tokens, dtype=np.int64)

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """One un-normalised action `[A]` for an observation dict `{"image", "instruction"}`."""
        return self.model.actions(self.predict_tokens(obs))

    def reset(self) -> None:
        """Start of an episode (the policy keeps no per-episode state)."""

    def clear_stats(self) -> None:
        """Forget the statistics gathered so far (after a warm-up)."""
        self._stats = RollingStats()
        self._decode = DecodeStats(self._decode.gamma)
        self._calls = 0

    def stats(self) -> dict[str, Any]:
        """Calls, draft acceptance (None without a draft), decoding counters and per-stage ms (prefix, decode, total)."""
        decode = self._decode.summary()
        return {"calls": self._calls, "acceptance_rate": decode["acceptance_rate"] if self.decoder is not None else None,
                "decoding": decode, "stages": self._stats.summary()}
