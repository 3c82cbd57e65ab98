"""The speculative engine: prefix → draft → gate → (accept: decode coarse | reject: resume, head, decode).

docs/architecture.md, "The early-exit design". This module knows nothing about observations, cameras or robots: it takes model inputs
(`VLAInputs`) and returns action chunks, how many of their leading steps to execute, and the per-stage timing.
`rsd.runtime.policy` wraps it for the control loop. The gate (`rsd.runtime.gate.Gate`) accepts a whole draft
chunk or, in "prefix" mode, only its confident leading steps; a rejected row's chunk is the main model's, all
of it to be executed.

Expected latency: `t_vision + t_prefix(k) + t_draft + (1 - p_accept) * (t_suffix(k) + t_head)` plus decode.

The main model runs through `segments` (`rsd.runtime.compiled`): eager by default, or compiled graphs with static
shapes, warmed up by `warm_up()` before the loop.

Usage:
    engine = SpeculativeEngine(main, draft_engine, {3: coarse_decoder, 8: full_decoder}, exit_layer=3, gate=Gate(tau=0.9),
                               segments=make_segments(main, "auto"))
    engine.warm_up()
    result = engine.run(main.prepare(images, instructions, proprio))
    result.actions[0, : result.steps[0]]   # the steps to execute
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from rsd.errors import ConfigError, ShapeError
from rsd.models.main import MainModel
from rsd.models.processor import VLAInputs
from rsd.runtime.compiled import CompiledSegments, Segments
from rsd.runtime.engines import DecoderEngine, DraftEngine
from rsd.runtime.gate import Gate, top_probability
from rsd.runtime.timing import StageTimer
from rsd.tokenizer import layers_to_tokens, tokens_to_layers

Verify = Literal["never", "always"]


@dataclass
class EngineResult:
    """One batch's chunks and what produced them."""

    actions: torch.Tensor  # [B, H, A] un-normalised actions
    accepted: torch.Tensor  # [B] bool: the draft's chunk (or its leading steps) was returned
    steps: torch.Tensor  # [B] int64 leading steps of the chunk to execute: H unless a prefix of the draft was accepted
    confidence: torch.Tensor  # [B] the draft's gate statistic (nan for main-only)
    tokens: torch.Tensor  # [B, H, d, c] the tokens decoded (c = C when accepted, L otherwise)
    timings: dict[str, float] = field(default_factory=dict)  # ms per stage
    agreement: torch.Tensor | None = None  # [B] share of coarse tokens where draft == main (verify="always")


class MainOnlyEngine:
    """The baseline: full forward, main RFSQ head, decoder on all L layers (no draft)."""

    def __init__(self, main: MainModel, full_decoder: DecoderEngine, segments: Segments | None = None) -> None:
        self.main = main
        self.segments = segments or Segments(main)
        self.full_decoder = self.segments.decoder_engine(full_decoder)
        self.device = next(main.vla.parameters()).device

    @torch.inference_mode()
    def run(self, inputs: VLAInputs) -> EngineResult:
        """Chunks `[B, H, A]` for a batch of model inputs through the whole main model."""
        segments = self.segments
        inputs = segments.prepare(inputs)
        segments.begin_step()
        timer = StageTimer(self.device)
        with timer("vision"):
            state = segments.embed(inputs)
        with timer("llm"):
            hidden = segments.resume(state)
        with timer("head"):
            tokens = segments.head(hidden)
        with timer("decode"):
            actions = self.full_decoder(tokens)
        batch = actions.shape[0]
        return EngineResult(
            actions=segments.output(actions),
            accepted=torch.zeros(batch, dtype=torch.bool),
            steps=torch.full((batch,), actions.shape[1], dtype=torch.int64),
            confidence=torch.full((batch,), math.nan),
            tokens=segments.output(tokens),
            timings=timer.timings,
        )

    @torch.inference_mode()
    def warm_up(self, inputs: VLAInputs | None = None) -> None:
        """Run every stage `CompileConfig.warmup` times (compiling its graphs) before the control loop."""
        inputs = self.segments.prepare(self.segments.warm_inputs() if inputs is None else inputs)
        for _ in range(_warmup_calls(self.segments)):
            self.run(inputs)


class SpeculativeEngine:
    """Early-exit speculative decoding of action chunks around a frozen main model."""

    def __init__(
        self,
        main: MainModel,
        draft: DraftEngine,
        decoders: dict[int, DecoderEngine],
        exit_layer: int,
        gate: Gate,
        verify: Verify = "never",
        segments: Segments | None = None,
    ) -> None:
        tok = main.tokenizer.config
        if not 0 <= exit_layer <= main.num_layers:
            raise ConfigError(f"SpeculativeEngine.exit_layer: expected an int in 0..{main.num_layers}, got {exit_layer}.")
        if set(decoders) != {tok.coarse_layers, tok.num_layers}:
            raise ConfigError(
                f"SpeculativeEngine.decoders: expected decoders for c = {tok.coarse_layers} and c = {tok.num_layers}, "
                f"got {sorted(decoders)}."
            )
        if verify not in ("never", "always"):
            raise ConfigError(f"SpeculativeEngine.verify: expected 'never' or 'always', got {verify!r}.")
        if not isinstance(gate, Gate):
            raise ConfigError(f"SpeculativeEngine.gate: expected a rsd.runtime.gate.Gate, got {type(gate).__name__} {gate!r}.")
        if (problem := gate.misfit(tok.chunk_len, tok.coarse_layers)) is not None:
            raise ConfigError(f"SpeculativeEngine.gate: {problem}.")
        self.main = main
        self.segments = segments or Segments(main)
        self.draft = self.segments.draft_engine(draft)
        self.decoders = {c: self.segments.decoder_engine(decoder) for c, decoder in decoders.items()}
        self.exit_layer = exit_layer
        self.gate = gate
        self.verify = verify
        self.device = next(main.vla.parameters()).device

    @torch.inference_mode()
    def run(self, inputs: VLAInputs) -> EngineResult:
        """Chunks `[B, H, A]` for a batch, skipping layers `exit_layer..N-1` when the gate accepts every row.

        One device-to-host copy per call (the gate's decision); the rest stays on the device. Rejected rows are
        resumed with the whole batch (static shapes; at batch 1, the control loop, there is nothing to select), and a
        mixed batch takes each row's chunk from the draft or the main model with `torch.where`, not by scattering.
        """
        tok = self.main.tokenizer.config
        segments = self.segments
        inputs = segments.prepare(inputs)
        segments.begin_step()
        timer = StageTimer(self.device)
        with timer("vision"):
            state = segments.embed(inputs)
        with timer("prefix"):
            state = segments.advance(state, self.exit_layer)
        with timer("draft"):
            logits, draft_layers = self.draft(state.query_hidden)
        with timer("gate"):
            mean, minimum, per_step = self.gate.confidences(top_probability(logits), tok.chunk_len, tok.latent_dim)
            # The acceptance rule (rsd.runtime.gate): a row returns the draft's chunk when its calibrated confidence
            # reaches tau, all of it ("chunk") or the run of leading steps whose confidence reaches tau if it is at
            # least min_steps long ("prefix"); tau = 0 accepts every chunk in full, tau = inf none. Rejected rows
            # resume the main model from the stored layer-k states, so no layer below exit_layer runs twice, and
            # execute the main model's whole chunk.
            draft_steps = self.gate.accepted_steps(mean, minimum, per_step)
            statistic = self.gate.statistic_of(mean, minimum, per_step)
            decision = torch.stack([draft_steps.double(), statistic.double()]).cpu()  # the one synchronisation
        accepted = decision[0] > 0
        steps = torch.where(accepted, decision[0].to(torch.int64), tok.chunk_len)
        batch, taken = accepted.shape[0], int(accepted.sum())
        draft_tokens = layers_to_tokens(draft_layers.to(torch.int64), tok.chunk_len, tok.latent_dim)
        agreement = None
        if taken:
            with timer("decode"):
                draft_actions = self.decoders[tok.coarse_layers](draft_tokens).float()
            draft_tokens = _pad_layers(draft_tokens, tok.num_layers, tok.zero_level)
        if taken < batch or self.verify == "always":
            with timer("suffix"):
                hidden = segments.resume(state)
            with timer("head"):
                main_tokens = segments.head(hidden)
            if self.verify == "always":
                coarse = tokens_to_layers(main_tokens)[:, : tok.coarse_layers]
                agreement = (coarse == draft_layers.to(torch.int64)).float().flatten(1).mean(dim=1).cpu()
            if taken < batch:
                with timer("decode"):
                    main_actions = self.decoders[tok.num_layers](main_tokens).float()
        if taken == batch:
            actions, tokens = draft_actions, draft_tokens
        elif taken == 0:
            actions, tokens = main_actions, main_tokens
        else:
            rows = accepted.to(self.device)
            actions = torch.where(rows[:, None, None], draft_actions, main_actions)
            tokens = torch.where(rows[:, None, None, None], draft_tokens, main_tokens)
        return EngineResult(
            actions=segments.output(actions),
            accepted=accepted,
            steps=steps,
            confidence=decision[1].float(),
            tokens=segments.output(tokens),
            timings=timer.timings,
            agreement=agreement,
        )

    @torch.inference_mode()
    def warm_up(self, inputs: VLAInputs | None = None) -> None:
        """Run every stage of both paths `CompileConfig.warmup` times (compiling its graphs) before the control loop."""
        tok = self.main.tokenizer.config
        segments = self.segments
        inputs = segments.prepare(segments.warm_inputs() if inputs is None else inputs)
        for _ in range(_warmup_calls(segments)):
            segments.begin_step()
            state = segments.advance(segments.embed(inputs), self.exit_layer)
            _, draft_layers = self.draft(state.query_hidden)
            self.decoders[tok.coarse_layers](layers_to_tokens(draft_layers.to(torch.int64), tok.chunk_len, tok.latent_dim))
            self.decoders[tok.num_layers](segments.head(segments.resume(state)))


def _warmup_calls(segments: Segments) -> int:
    """Warm-up calls: the compile config's count, one for eager segments."""
    return segments.config.warmup if isinstance(segments, CompiledSegments) else 1


def _pad_layers(tokens: torch.Tensor, num_layers: int, zero_level: int) -> torch.Tensor:
    """Extend tokens `[B, H, d, c]` to `[B, H, d, L]` with the zero level (what decoding c layers means)."""
    if tokens.ndim != 4:
        raise ShapeError(f"_pad_layers: expected tokens [B, H, d, c], got {tuple(tokens.shape)}.")
    pad = torch.full((*tokens.shape[:3], num_layers - tokens.shape[3]), zero_level, dtype=tokens.dtype, device=tokens.device)
    return torch.cat([tokens, pad], dim=3)
