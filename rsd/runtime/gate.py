"""The gate: which rows of a batch return the draft's chunk (or its leading steps) instead of the main model's.

A wrong draft costs the task only through the actions that are executed, so the gate can accept less than a
whole chunk. Two modes, chosen and calibrated by `rsd calibrate` and stored in the bundle manifest's "gate":

- "chunk": the draft's whole chunk is accepted when its `statistic` ("mean" or "min", over the coarse tokens,
  of the max softmax probability) reaches `tau`.
- "prefix" (partial acceptance): the leading steps whose confidence ("step": the min over that step's coarse
  tokens) all reach `tau` are accepted, provided there are at least `min_steps` of them; the policy executes
  only those steps and replans sooner, so its action queue never repeats or skips a step. `max_steps` caps the
  accepted run at the steps the policy executes per chunk (its `replan_every`): calibration then judges exactly
  the executed steps, and `min_steps = max_steps = N` accepts the first N steps all or nothing.

The confidence reads the coarse RFSQ layers' tokens; `layers` limits it to the coarsest few. The finer layers
correct a residual at a smaller scale, so an unsure fine token barely moves the action, yet with all C layers
read the least sure token of a step is nearly always a fine one. On held-out chunks the coarsest layer alone
ranks bad drafts better; in closed loop it did no better at equal acceptance (docs/results.md), so the default
reads all C.

In both modes tau = 0 accepts every chunk in full (every confidence is >= 0) and tau = inf accepts nothing, so
the speculative engine then returns exactly the draft's or exactly the main model's chunk. The same rule
(`Gate.accepted_steps`) drives calibration (`rsd.training.calibrate`) and the runtime (`rsd.runtime.speculative`).

Usage:
    gate = Gate(tau=0.62, mode="prefix", statistic="step", min_steps=6)   # or min_steps=4, max_steps=4 with replan_every=4
    mean, minimum, step = gate.confidences(top_probabilities, chunk_len=8, latent_dim=16)   # top [B, C, H*d]
    steps = gate.accepted_steps(mean, minimum, step)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from rsd.bundle import describe_gate, gate_fields
from rsd.errors import CheckpointError, ConfigError, ShapeError

Mode = Literal["chunk", "prefix"]
Statistic = Literal["mean", "min", "step"]
STATISTICS: dict[str, tuple[str, ...]] = {"chunk": ("mean", "min"), "prefix": ("step",)}  # the statistics each mode gates on


@dataclass(frozen=True)
class Gate:
    """When the draft is accepted: `statistic >= tau`, for the whole chunk or for its leading steps."""

    tau: float = math.inf  # threshold on the confidence; 0 accepts every chunk in full, inf never accepts
    mode: Mode = "chunk"  # "chunk": all or nothing; "prefix": the confident leading steps
    statistic: Statistic = "mean"  # chunk: "mean" or "min" over the coarse tokens; prefix: "step"
    min_steps: int = 1  # prefix: fewest leading steps worth accepting (chunk mode ignores it)
    max_steps: int | None = None  # prefix: most leading steps accepted, the steps the policy executes per chunk (None: all)
    layers: int | None = None  # coarse layers the confidence reads, coarsest first (None: all C the draft predicts)

    def __post_init__(self) -> None:
        if isinstance(self.tau, bool) or not isinstance(self.tau, int | float) or math.isnan(self.tau) or self.tau < 0:
            raise ConfigError(f"Gate.tau: expected a float >= 0 or inf, got {self.tau!r}.")
        object.__setattr__(self, "tau", float(self.tau))
        if self.mode not in STATISTICS:
            raise ConfigError(f"Gate.mode: expected 'chunk' or 'prefix', got {self.mode!r}.")
        if self.statistic not in STATISTICS[self.mode]:
            raise ConfigError(f"Gate.statistic: expected one of {STATISTICS[self.mode]} for mode {self.mode!r}, got {self.statistic!r}.")
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 1:
            raise ConfigError(f"Gate.min_steps: expected an int >= 1, got {self.min_steps!r}.")
        if self.layers is not None and (isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1):
            raise ConfigError(f"Gate.layers: expected None or an int >= 1, got {self.layers!r}.")
        if self.max_steps is not None:
            if self.mode != "prefix":
                raise ConfigError(f"Gate.max_steps: expected None in chunk mode (a chunk gate judges the whole chunk), got {self.max_steps!r}.")
            if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < self.min_steps:
                raise ConfigError(f"Gate.max_steps: expected None or an int >= min_steps {self.min_steps}, got {self.max_steps!r}.")

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str, chunk_len: int | None = None, coarse_layers: int | None = None) -> Gate:
        """The gate of a manifest or calibration.json (`rsd.bundle.gate_fields`); an invalid one is a CheckpointError."""
        fields = gate_fields(data, source)
        try:
            gate = cls(**fields)
        except (ConfigError, TypeError) as error:
            raise CheckpointError(f"{source}: expected a valid gate, got {fields}: {error}") from error
        if (problem := gate.misfit(chunk_len, coarse_layers)) is not None:
            raise CheckpointError(f"{source}: {problem}. Re-run `rsd calibrate`.")
        return gate

    def misfit(self, chunk_len: int | None, coarse_layers: int | None) -> str | None:
        """Why this gate cannot run a draft of chunks of `chunk_len` steps and `coarse_layers` layers (None: it can;
        a None size is not checked)."""
        if chunk_len is not None and self.mode == "prefix" and max(self.min_steps, self.max_steps or 0) > chunk_len:
            return (f"expected a prefix gate's min_steps and max_steps of at most the chunk length {chunk_len}, "
                    f"got {self.min_steps} and {self.max_steps}")
        if coarse_layers is not None and (self.layers or 0) > coarse_layers:
            return f"expected a gate reading at most the draft's {coarse_layers} coarse layers, got layers {self.layers}"
        return None

    def to_json(self) -> dict[str, Any]:
        """The manifest's "gate" object."""
        return {"tau": self.tau, "mode": self.mode, "statistic": self.statistic, "min_steps": self.min_steps, "max_steps": self.max_steps,
                "layers": self.layers}

    def describe(self) -> str:
        """One line, e.g. "prefix gate, tau 0.6200 on the step confidence, at least 4 steps"."""
        return describe_gate(self.to_json())

    def confidences(self, top: torch.Tensor, chunk_len: int, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three confidences `accepted_steps` reads, from the draft's max softmax probabilities `top [B, C, H*d]`:
        mean `[B]` and min `[B]` over the tokens of the layers read, and per step the min over its tokens `[B, H]`."""
        if top.ndim != 3 or top.shape[2] != chunk_len * latent_dim or (self.layers or 0) > top.shape[1]:
            raise ShapeError(f"Gate.confidences: expected top probabilities [B, C >= {self.layers or 1}, {chunk_len * latent_dim}], "
                             f"got {tuple(top.shape)}.")
        read = top[:, : self.layers].float()
        return read.flatten(1).mean(dim=1), read.flatten(1).amin(dim=1), step_confidence(read, chunk_len, latent_dim)

    def statistic_of(self, mean: torch.Tensor, minimum: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The value `[B]` compared with tau: a row is accepted exactly when it reaches tau."""
        if self.mode == "prefix":
            return step[:, : self.min_steps].amin(dim=1)
        return mean if self.statistic == "mean" else minimum

    def accepted_steps(self, mean: torch.Tensor, minimum: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Leading steps `[B]` (int64) of each draft chunk to execute; 0 where the draft is rejected.

        Args:
            mean: `[B]` mean over the coarse tokens of the max softmax probability.
            minimum: `[B]` min of the same.
            step: `[B, H]` per step, the min over that step's coarse tokens (`step_confidence`).
        """
        if step.ndim != 2 or tuple(mean.shape) != (step.shape[0],) or tuple(minimum.shape) != (step.shape[0],):
            raise ShapeError(f"Gate.accepted_steps: expected mean [B], minimum [B], step [B, H], got "
                             f"{tuple(mean.shape)}, {tuple(minimum.shape)}, {tuple(step.shape)}.")
        horizon = step.shape[1]
        if self.mode == "chunk":
            # all or nothing: the whole chunk when its confidence reaches tau
            return torch.where(self.statistic_of(mean, minimum, step) >= self.tau, horizon, 0).to(torch.int64)
        # partial acceptance: the run of leading steps (up to max_steps) whose confidence reaches tau, if it is min_steps long
        leading = torch.cumprod((step[:, : self.max_steps] >= self.tau).to(torch.int64), dim=1).sum(dim=1)
        return torch.where(leading >= self.min_steps, leading, 0)


def top_probability(logits: torch.Tensor) -> torch.Tensor:
    """The max softmax probability `[B, C, H*d]` of each draft token, from logits `[B, C, H*d, V]`: every gate
    confidence is a mean or min of these."""
    return torch.softmax(logits.float(), dim=-1).amax(dim=-1)


def step_confidence(top: torch.Tensor, chunk_len: int, latent_dim: int) -> torch.Tensor:
    """Per step `[B, H]`: the min over that step's coarse tokens of the max softmax probability `top [B, C, H*d]`."""
    if top.ndim != 3 or top.shape[2] != chunk_len * latent_dim:
        raise ShapeError(f"step_confidence: expected top probabilities [B, C, {chunk_len * latent_dim}], got {tuple(top.shape)}.")
    return top.reshape(top.shape[0], top.shape[1], chunk_len, latent_dim).amin(dim=(1, 3))
