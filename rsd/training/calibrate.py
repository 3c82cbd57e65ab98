"""calibrate: choose the gate's threshold tau on held-out episodes, with a stated risk guarantee.

What a wrong draft costs the task is an action-space error, so a drafted step is **bad** when, in some action
dimension, it differs from the main model's own step by more than `tolerance` times the main model's typical
error against the expert in that dimension (measured on the same held-out frames, with a floor so that
dimensions the expert never moves still allow tiny differences). The main model's error is the yardstick: a
draft that stays within it is as good as the main model is, as far as the demonstrations can tell.

Gate modes:
- "chunk": the draft's whole chunk is accepted when its confidence (`statistic`: mean or min of the max softmax
  probability over its coarse tokens) reaches tau; a chunk is bad when any of its steps is.
- "prefix" (partial acceptance): the draft's leading steps are accepted while each step's confidence (min over
  its coarse tokens) reaches tau, if at least `min_steps` of them do; the policy executes them and replans
  sooner. A chunk is bad when any accepted step is. A prefix of s steps pays only if s > H * t_accept / t_reject
  (chunk times of the accept and reject paths; `rsd bench-latency`): about 5 of 8 for the tiny preset on a CPU,
  hence the default of 6. A policy that executes only N steps of any chunk (`replan_every=N`) never runs the
  rest, so `max_steps=N` caps the accepted run there: only executed steps count towards the risk, and with
  `min_steps=N` too the gate accepts the N executed steps all or nothing.

The held-out episodes (the draft's validation split) are split by episode into a calibration half and a test
half. On the calibration half, Learn-then-Test (`rsd.training.risk`) certifies the least strict tau with
"P(accepted and bad) <= alpha with probability >= 1 - delta"; the test half reports the realised acceptance
and risk on chunks the choice never saw.

Usage:
    rsd calibrate --draft runs/demo/draft --features runs/demo/features --alpha 0.05 --mode prefix
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd.data.chunks import split_episodes
from rsd.errors import ConfigError
from rsd.io import atomic_file, check_file_out, write_text_atomic
from rsd.models.draft import DraftHead
from rsd.runtime.gate import STATISTICS, Gate, Mode, Statistic, top_probability
from rsd.tokenizer import ActionTokenizer, layers_to_tokens
from rsd.training.features import Features, load_features
from rsd.training.risk import learn_then_test

log = logging.getLogger(__name__)

ERROR_FLOOR = 0.05  # smallest per-dimension yardstick (normalised units): dimensions the main model never misses


@dataclass
class DraftMeasurements:
    """Per held-out frame: the draft's confidences and its steps' errors relative to the main model's."""

    mean: np.ndarray  # [N] mean max-softmax probability over the coarse tokens
    min: np.ndarray  # [N] min of the same
    step: np.ndarray  # [N, H] per step: min over that step's coarse tokens
    step_error: np.ndarray  # [N, H] per step: max over dims of |draft - main| / yardstick
    agreement: np.ndarray  # [N] share of coarse tokens equal to the main model's
    episode: np.ndarray  # [N] episode ids


def gate_outcome(measured: DraftMeasurements, gate: Gate, tolerance: float,
                 ) -> tuple[np.ndarray, Callable[[float], tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """The gate's statistic `[N]` (LTT's candidate thresholds) and `outcome(tau) -> (accepted, bad, steps)` `[N]` each.

    The runtime's own rule (`Gate.accepted_steps`) decides which leading steps are accepted at each tau; a chunk
    is bad when any accepted step is.
    """
    bad_step = measured.step_error > tolerance
    mean, minimum, step = (torch.as_tensor(a) for a in (measured.mean, measured.min, measured.step))

    def outcome(tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        steps = dataclasses.replace(gate, tau=tau).accepted_steps(mean, minimum, step).numpy()
        reach = np.arange(bad_step.shape[1])[None, :] < steps[:, None]
        return steps > 0, (bad_step & reach).any(axis=1), steps

    return gate.statistic_of(mean, minimum, step).numpy(), outcome


@torch.inference_mode()
def measure_draft(head: DraftHead, feats: Features, rows: torch.Tensor, yardstick: torch.Tensor, gate: Gate) -> DraftMeasurements:
    """The gate's confidences (from the coarse layers it reads) and per-step relative errors of the draft on feature
    `rows` (yardstick `[A]`, normalised units)."""
    tok = feats.tokenizer.config
    logits = torch.cat([head.forward_logits(feats.exit_hidden[rows[i : i + 512]].float()) for i in range(0, len(rows), 512)])
    tokens = logits.argmax(dim=-1)  # [N, C, H*d]: the tokens the runtime's draft engine returns
    mean, minimum, per_step = gate.confidences(top_probability(logits), tok.chunk_len, tok.latent_dim)  # [N], [N], [N, H]
    main = feats.main_tokens[rows]
    draft_actions, main_actions = decode_pair(feats.tokenizer, tokens, main)
    error = ((draft_actions - main_actions).abs() * feats.tokenizer.stats.normalized_scale() / yardstick).amax(dim=2)
    return DraftMeasurements(
        mean=mean.numpy(), min=minimum.numpy(), step=per_step.numpy(), step_error=error.numpy(),
        agreement=(tokens == main[:, : tok.coarse_layers]).float().flatten(1).mean(1).numpy(), episode=feats.episode_id[rows].numpy())


def decode_pair(tokenizer: ActionTokenizer, draft_layers: torch.Tensor, main_layers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Actions `[N, H, A]` decoded from the draft's C layers `[N, C, H*d]` and from the main model's L layers `[N, L, H*d]`."""
    tok = tokenizer.config
    return (tokenizer.decode(layers_to_tokens(draft_layers, tok.chunk_len, tok.latent_dim)),
            tokenizer.decode(layers_to_tokens(main_layers, tok.chunk_len, tok.latent_dim)))


def main_model_error(feats: Features, rows: torch.Tensor) -> torch.Tensor:
    """The main model's mean absolute error against the demonstrated chunks per dimension `[A]` (normalised units)."""
    main_actions, expert_actions = decode_pair(feats.tokenizer, feats.main_tokens[rows], feats.gt_tokens[rows])
    return ((main_actions - expert_actions).abs() * feats.tokenizer.stats.normalized_scale()).mean(dim=(0, 1))


@torch.inference_mode()
def calibrate(
    draft: str | Path,
    features: str | Path,
    out: str | Path | None = None,
    alpha: float = 0.05,
    delta: float = 0.1,
    tolerance: float = 1.0,
    mode: Mode = "prefix",
    statistic: Statistic | None = None,
    min_steps: int = 6,
    max_steps: int | None = None,
    layers: int | None = None,
    seed: int = 0,
    plot: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Certify tau for `draft` on held-out feature episodes (Learn-then-Test), report it on a test half; write JSON and a plot.

    `statistic` defaults to the mode's own ("step" for prefix, "min" for chunk); `min_steps` and `max_steps` (None: the
    whole chunk) apply to prefix mode; `layers` is how many coarse layers the confidence reads (None: all).
    `out` and its plot are written atomically; an existing calibration at `out` needs `overwrite=True`.
    """
    if mode not in STATISTICS:
        raise ConfigError(f"calibrate --mode: expected 'chunk' or 'prefix', got {mode!r}.")
    stat = statistic or ("step" if mode == "prefix" else "min")
    if stat not in STATISTICS[mode]:
        raise ConfigError(f"calibrate --statistic: expected one of {STATISTICS[mode]} with --mode {mode}, got {stat!r}.")
    if not tolerance > 0:
        raise ConfigError(f"calibrate --tolerance: expected a positive float, got {tolerance}.")
    if out is not None:
        check_file_out(out, "calibration", overwrite)
    feats = load_features(features)
    tok = feats.tokenizer.config
    if not 1 <= min_steps <= tok.chunk_len:
        raise ConfigError(f"calibrate --min-steps: expected an int in 1..{tok.chunk_len}, got {min_steps}.")
    if layers is not None and not 1 <= layers <= tok.coarse_layers:
        raise ConfigError(f"calibrate --confidence-layers: expected an int in 1..{tok.coarse_layers} (the draft's coarse layers), got {layers}.")
    if max_steps is not None and (mode != "prefix" or not min_steps <= max_steps <= tok.chunk_len):
        raise ConfigError(f"calibrate --max-steps: expected it with --mode prefix and in {min_steps}..{tok.chunk_len} "
                          f"(--min-steps to the chunk length), got {max_steps} with --mode {mode}.")
    head, meta = DraftHead.load(draft, expect_hidden=int(feats.index["hidden_size"]), expect_exit_layer=feats.exit_layer,
                                expect_fingerprint=feats.index["main_fingerprint"])
    held_out = np.array(meta["val_episodes"])
    calib_eps, test_eps = split_episodes(held_out, 0.5, seed)
    calib_rows, test_rows = feats.rows(calib_eps), feats.rows(test_eps)
    yardstick = main_model_error(feats, calib_rows).clamp_min(ERROR_FLOOR)
    shape = Gate(tau=math.inf, mode=mode, statistic=stat, min_steps=min_steps if mode == "prefix" else 1, max_steps=max_steps, layers=layers)
    calib = measure_draft(head, feats, calib_rows, yardstick, shape)
    test = measure_draft(head, feats, test_rows, yardstick, shape)
    confidence, outcome = gate_outcome(calib, shape, tolerance)
    control = learn_then_test(confidence, outcome, alpha, delta)
    if math.isinf(control.tau):
        log.warning("calibrate: no threshold is certified at alpha %.3f, delta %.2f; tau = inf (the draft is never accepted).", alpha, delta)
    gate = dataclasses.replace(shape, tau=control.tau)
    report = {
        "kind": "calibration",
        "gate": gate.to_json(),
        "risk": {"alpha": alpha, "delta": delta, "tolerance": tolerance, "yardstick": [float(v) for v in yardstick],
                 "guarantee": control.guarantee, "upper_bound": control.upper_bound},
        "exit_layer": feats.exit_layer,
        "main_fingerprint": feats.index["main_fingerprint"],
        "calibration": {"episodes": [int(e) for e in calib_eps], "frames": int(len(calib_rows)),
                        **summarize_gate(calib, gate, tolerance),
                        "curve": risk_curve(calib, gate, tolerance)},
        "test": {"episodes": [int(e) for e in test_eps], "frames": int(len(test_rows)),
                 **summarize_gate(test, gate, tolerance)},
        "token_agreement_all": float(np.concatenate([calib.agreement, test.agreement]).mean()),
    }
    if out is not None:
        out = Path(out)
        if plot:
            with atomic_file(out.with_suffix(".png")) as image:
                plot_curve(report, image)
        write_text_atomic(out, json.dumps(report, indent=2, allow_nan=True) + "\n", kind="calibration", overwrite=overwrite)
    return report


def summarize_gate(measured: DraftMeasurements, gate: Gate, tolerance: float) -> dict[str, float]:
    """Acceptance, risk (accepted and bad), steps per accepted chunk and token agreement at the gate's tau."""
    _, outcome = gate_outcome(measured, gate, tolerance)
    accepted, bad, steps = outcome(gate.tau)
    count = int(accepted.sum())
    return {
        "tau": gate.tau,
        "coverage": float(accepted.mean()) if len(accepted) else 0.0,
        "risk": float(bad.mean()) if len(bad) else 0.0,
        "risk_given_accepted": float(bad[accepted].mean()) if count else 0.0,
        "steps_per_accepted": float(steps[accepted].mean()) if count else 0.0,
        "agreement": float(measured.agreement[accepted].mean()) if count else math.nan,
        "accepted": count,
    }


def risk_curve(measured: DraftMeasurements, gate: Gate, tolerance: float, count: int = 100) -> list[dict[str, float]]:
    """`summarize_gate` for the gate's mode over `count` thresholds spanning the observed statistic (and inf)."""
    confidence, _ = gate_outcome(measured, gate, tolerance)
    taus = np.unique(np.concatenate([np.quantile(confidence, np.linspace(0.0, 1.0, count)), [np.inf]])) if len(confidence) else [np.inf]
    return [summarize_gate(measured, dataclasses.replace(gate, tau=float(t)), tolerance) for t in taus]


def plot_curve(report: dict[str, Any], path: Path) -> None:
    """Coverage and risk against tau on the calibration half, with the certified tau and alpha marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [p for p in report["calibration"]["curve"] if math.isfinite(p["tau"])]
    taus = [p["tau"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(taus, [p["coverage"] for p in curve], label="coverage (acceptance rate)")
    ax.plot(taus, [p["risk"] for p in curve], label="risk: P(accepted and bad)")
    ax.plot(taus, [p["agreement"] for p in curve], label="token agreement | accepted")
    if math.isfinite(report["gate"]["tau"]):
        ax.axvline(report["gate"]["tau"], color="k", linestyle="--", label=f"certified tau = {report['gate']['tau']:.3f}")
    ax.axhline(report["risk"]["alpha"], color="r", linestyle=":", label=f"alpha = {report['risk']['alpha']}")
    ax.set_xlabel(f"tau ({report['gate']['statistic']} token confidence, {report['gate']['mode']} gate)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title(f"draft calibration, exit layer {report['exit_layer']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
