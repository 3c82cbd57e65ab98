"""Normalisation statistics of actions (and proprio), in OpenVLA's `dataset_statistics.json` layout.

OpenVLA's BOUNDS_Q99 convention: `x_norm = 2 * (x - q01) / (q99 - q01) - 1`, clipped to [-1, 1];
dimensions whose `mask` is false are passed through unchanged (OpenVLA leaves the gripper alone).

Usage:
    stats = ActionStats.from_actions(all_actions)                 # all_actions [N, A]
    write_dataset_statistics(path, {"tabletop": DatasetStatistics(action=stats)})
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd.errors import DataError, ShapeError

EPS = 1e-8


@dataclass(frozen=True)
class ActionStats:
    """Per-dimension statistics of one quantity; `q01`/`q99` bound the normalisation."""

    mean: tuple[float, ...]  # per-dimension mean
    std: tuple[float, ...]  # per-dimension standard deviation
    min: tuple[float, ...]  # per-dimension minimum
    max: tuple[float, ...]  # per-dimension maximum
    q01: tuple[float, ...]  # 1st percentile (lower normalisation bound)
    q99: tuple[float, ...]  # 99th percentile (upper normalisation bound)
    mask: tuple[bool, ...]  # true where the dimension is normalised

    def __post_init__(self) -> None:
        dims = {len(v) for v in (self.mean, self.std, self.min, self.max, self.q01, self.q99, self.mask)}
        if len(dims) != 1:
            raise DataError(f"ActionStats: expected every field to have the same length, got lengths {sorted(dims)}.")
        values = np.array([self.mean, self.std, self.min, self.max, self.q01, self.q99], dtype=np.float64)
        if not np.isfinite(values).all():
            raise DataError("ActionStats: expected finite statistics, got NaN or inf.")

    @property
    def dim(self) -> int:
        """Number of dimensions."""
        return len(self.mean)

    @classmethod
    def from_actions(cls, values: np.ndarray, mask: tuple[bool, ...] | None = None) -> ActionStats:
        """Compute statistics over rows `values [N, A]`; `mask` defaults to all dimensions normalised."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[0] == 0:
            raise ShapeError(f"ActionStats.from_actions: expected values [N, A] with N > 0, got shape {values.shape}.")
        if not np.isfinite(values).all():
            raise DataError("ActionStats.from_actions: expected finite values, got NaN or inf.")
        dims = values.shape[1]

        def row(x: np.ndarray) -> tuple[float, ...]:
            return tuple(float(v) for v in x)

        return cls(
            mean=row(values.mean(0)),
            std=row(values.std(0)),
            min=row(values.min(0)),
            max=row(values.max(0)),
            q01=row(np.quantile(values, 0.01, axis=0)),
            q99=row(np.quantile(values, 0.99, axis=0)),
            mask=tuple(mask) if mask is not None else (True,) * dims,
        )

    def to_json(self) -> dict[str, Any]:
        """The OpenVLA-style JSON object of these statistics."""
        return {k: list(getattr(self, k)) for k in ("mean", "std", "max", "min", "q01", "q99", "mask")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ActionStats:
        """Read the object written by `to_json` (or OpenVLA's own); a missing key is a DataError."""
        missing = [k for k in ("q01", "q99") if k not in data]
        if missing:
            raise DataError(f"ActionStats.from_json: expected keys q01 and q99, missing {missing}.")
        dims = len(data["q01"])
        return cls(
            mean=tuple(float(v) for v in data.get("mean", [0.0] * dims)),
            std=tuple(float(v) for v in data.get("std", [1.0] * dims)),
            min=tuple(float(v) for v in data.get("min", data["q01"])),
            max=tuple(float(v) for v in data.get("max", data["q99"])),
            q01=tuple(float(v) for v in data["q01"]),
            q99=tuple(float(v) for v in data["q99"]),
            mask=tuple(bool(v) for v in data.get("mask", [True] * dims)),
        )

    def normalized_scale(self) -> torch.Tensor:
        """Per-dimension factor `[A]` turning a difference in dataset units into normalised units (1 where unmasked)."""
        low, high, mask = self.tensors()
        return torch.where(mask, 2.0 / (high - low).clamp_min(EPS), torch.ones_like(low))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(low, high, mask)` as float32/bool tensors `[A]` for normalisation modules."""
        return (
            torch.tensor(self.q01, dtype=torch.float32),
            torch.tensor(self.q99, dtype=torch.float32),
            torch.tensor(self.mask, dtype=torch.bool),
        )


def normalize(x: torch.Tensor, stats: ActionStats, warn: bool = True) -> tuple[torch.Tensor, int]:
    """Map `x [..., A]` to [-1, 1] with q01/q99 bounds; clip, and return the number of clipped values."""
    if x.shape[-1] != stats.dim:
        raise ShapeError(f"normalize: expected last dimension {stats.dim}, got shape {tuple(x.shape)}.")
    low, high, mask = (t.to(x.device) for t in stats.tensors())
    scaled = 2.0 * (x - low.to(x.dtype)) / (high - low).clamp_min(EPS).to(x.dtype) - 1.0
    clipped_count = int(((scaled.abs() > 1.0) & mask).sum())
    if clipped_count and warn:
        warnings.warn(f"normalize: {clipped_count} values lay outside the q01/q99 range and were clipped to [-1, 1].", stacklevel=2)
    return torch.where(mask, scaled.clamp(-1.0, 1.0), x), clipped_count


def unnormalize(x: torch.Tensor, stats: ActionStats) -> torch.Tensor:
    """Inverse of `normalize` for values in [-1, 1]: `x [..., A]` to the dataset's units."""
    if x.shape[-1] != stats.dim:
        raise ShapeError(f"unnormalize: expected last dimension {stats.dim}, got shape {tuple(x.shape)}.")
    low, high, mask = (t.to(x.device) for t in stats.tensors())
    value = 0.5 * (x + 1.0) * (high - low).to(x.dtype) + low.to(x.dtype)
    return torch.where(mask, value, x)


@dataclass(frozen=True)
class DatasetStatistics:
    """Statistics of one dataset: actions, optional proprio, and counts (one entry of the JSON file)."""

    action: ActionStats  # action statistics
    proprio: ActionStats | None = None  # proprio statistics, if the dataset has proprio
    num_transitions: int = 0  # steps in the dataset
    num_trajectories: int = 0  # episodes in the dataset

    def to_json(self) -> dict[str, Any]:
        """The OpenVLA-style JSON object."""
        out: dict[str, Any] = {"action": self.action.to_json()}
        if self.proprio is not None:
            out["proprio"] = self.proprio.to_json()
        out["num_transitions"] = self.num_transitions
        out["num_trajectories"] = self.num_trajectories
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetStatistics:
        """Read one dataset entry of a `dataset_statistics.json`."""
        if "action" not in data:
            raise DataError(f"dataset statistics: expected an 'action' entry, got keys {sorted(data)}.")
        return cls(
            action=ActionStats.from_json(data["action"]),
            proprio=ActionStats.from_json(data["proprio"]) if "proprio" in data else None,
            num_transitions=int(data.get("num_transitions", 0)),
            num_trajectories=int(data.get("num_trajectories", 0)),
        )


def write_dataset_statistics(path: str | Path, stats: dict[str, DatasetStatistics]) -> None:
    """Write `{dataset_key: statistics}` as OpenVLA's `dataset_statistics.json`."""
    Path(path).write_text(json.dumps({k: v.to_json() for k, v in stats.items()}, indent=2) + "\n")


def read_dataset_statistics(path: str | Path, key: str | None = None) -> DatasetStatistics:
    """Read one dataset's statistics; `key` must be given when the file holds several (no silent guess)."""
    data = json.loads(Path(path).read_text())
    if key is None:
        if len(data) != 1:
            raise DataError(f"{path}: holds statistics for {sorted(data)}; name the dataset key to use.")
        key = next(iter(data))
    if key not in data:
        raise DataError(f"{path}: expected statistics key {key!r}, found {sorted(data)}.")
    return DatasetStatistics.from_json(data[key])
