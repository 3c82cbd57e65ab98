"""The gate: which rows of a batch return the draft's chunk (or its leading steps) instead of the main model's.

A wrong draft costs the task only through the actions that are executed, so the gate can accept less than a
whole chunk. Two modes, chosen and calibrated by `rsd calibrate` and stored in the bundle manifest's "gate":

- "chunk": the draft's whole chunk is accepted when its `statistic` ("mean" or "min", over the coarse tokens,
  of the max softmax probability) reaches `tau`.
- "prefix" (partial acceptance): the leading steps whose confidence ("step": the min over that step's coarse
  tokens) all reach `tau` are accepted, provided there are at least `min_steps` of them; the policy executes
  only those steps and replans sooner, so its action queue never repeats or skips a step.

In both modes tau = 0 accepts every chunk in full (every confidence is >= 0) and tau = inf accepts nothing, so
the speculative engine then returns exactly the draft's or exactly the main model's chunk. The same rule
(`Gate.accepted_steps`) drives calibration (`rsd.training.calibrate`) and the runtime (`rsd.runtime.speculative`).

Usage:
    gate = Gate(tau=0.62, mode="prefix", statistic="step", min_steps=6)
    steps = gate.accepted_steps(confidence, confidence_min, step_confidence(logits, chunk_len=8, latent_dim=16))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from rsd.bundle import gate_fields
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

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str, chunk_len: int | None = None) -> Gate:
        """The gate of a manifest or calibration.json (`rsd.bundle.gate_fields`); an invalid one is a CheckpointError."""
        fields = gate_fields(data, source)
        try:
            gate = cls(**fields)
        except (ConfigError, TypeError) as error:
            raise CheckpointError(f"{source}: expected a valid gate, got {fields}: {error}") from error
        if chunk_len is not None and gate.mode == "prefix" and gate.min_steps > chunk_len:
            raise CheckpointError(f"{source}: expected a prefix gate's min_steps of at most the chunk length {chunk_len}, "
                                  f"got {gate.min_steps}. Re-run `rsd calibrate`.")
        return gate

    def to_json(self) -> dict[str, Any]:
        """The manifest's "gate" object."""
        return {"tau": self.tau, "mode": self.mode, "statistic": self.statistic, "min_steps": self.min_steps}

    def describe(self) -> str:
        """One line, e.g. "prefix gate, tau 0.6200 on the step confidence, at least 4 steps"."""
        tau = "inf (never accept)" if math.isinf(self.tau) else f"{self.tau:.4f}"
        extra = f", at least {self.min_steps} steps" if self.mode == "prefix" else ""
        return f"{self.mode} gate, tau {tau} on the {self.statistic} confidence{extra}"

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
        # partial acceptance: the run of leading steps whose confidence reaches tau, if it is min_steps long
        leading = torch.cumprod((step >= self.tau).to(torch.int64), dim=1).sum(dim=1)
        return torch.where(leading >= self.min_steps, leading, 0)


def step_confidence(top: torch.Tensor, chunk_len: int, latent_dim: int) -> torch.Tensor:
    """Per step `[B, H]`: the min over that step's coarse tokens of the max softmax probability `top [B, C, H*d]`."""
    if top.ndim != 3 or top.shape[2] != chunk_len * latent_dim:
        raise ShapeError(f"step_confidence: expected top probabilities [B, C, {chunk_len * latent_dim}], got {tuple(top.shape)}.")
    return top.reshape(top.shape[0], top.shape[1], chunk_len, latent_dim).amin(dim=(1, 3))
