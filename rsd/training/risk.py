"""Risk control for the gate: pick tau with a finite-sample guarantee (Learn-then-Test, fixed-sequence testing).

The gate accepts a chunk when the draft's confidence is at least tau. A chunk's loss is 1 when it is accepted
*and* bad (what "bad" means is the caller's: see `rsd.training.calibrate`), so the risk

    R(tau) = P(confidence >= tau and bad)

is non-increasing in tau. Learn-then-Test (Angelopoulos et al. 2021, as CALM uses it for early exit) turns
"R(tau) <= alpha" into a hypothesis test per tau: H0(tau): R(tau) > alpha, rejected when the binomial p-value
`P(Binom(n, alpha) <= k(tau))` of the observed k(tau) losses among n calibration chunks is at most delta.
Testing the thresholds in a fixed order, strictest first, and stopping at the first failure controls the
family-wise error at delta, so:

    with probability >= 1 - delta over the calibration chunks, every certified tau has R(tau) <= alpha,

provided the deployment chunks are exchangeable with the calibration chunks (calibrate on the states the
policy visits, not only on the expert's). The least strict certified tau is returned.

Usage:
    result = learn_then_test(confidence, threshold_outcome(confidence, bad), alpha=0.05, delta=0.1)
    result.tau, result.upper_bound
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rsd.errors import ConfigError, ShapeError


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binom(n, p) <= k), summed in log space (exact for the n of a calibration set)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def binomial_upper_bound(k: int, n: int, delta: float) -> float:
    """The one-sided (1 - delta) Clopper-Pearson upper bound on a rate with `k` events in `n` trials."""
    if n == 0:
        return 1.0
    if k >= n:
        return 1.0
    low, high = k / n, 1.0
    for _ in range(60):  # bisection: the largest p with P(Binom(n, p) <= k) >= delta
        mid = (low + high) / 2.0
        if binomial_cdf(k, n, mid) > delta:
            low = mid
        else:
            high = mid
    return high


@dataclass
class RiskControl:
    """The outcome of Learn-then-Test on one calibration set."""

    tau: float  # least strict certified threshold (inf when none is certified)
    alpha: float  # the risk level
    delta: float  # the allowed probability that the guarantee fails
    n: int  # calibration chunks
    coverage: float  # share of calibration chunks accepted at tau
    empirical_risk: float  # share of calibration chunks accepted and bad at tau
    upper_bound: float  # (1 - delta) upper confidence bound on R(tau) from the calibration chunks
    tested: int  # thresholds tested before the first failure (or all)

    @property
    def guarantee(self) -> str:
        """The statement the calibration certifies, in words."""
        return (f"with probability >= {1 - self.delta:.2f} over the calibration chunks, P(accepted and bad) <= {self.alpha:.3f} "
                "for deployment chunks exchangeable with them")


def candidate_thresholds(confidence: np.ndarray, count: int = 200) -> np.ndarray:
    """Thresholds to test, strictest first: +inf, then `count` quantiles of the confidences, descending."""
    quantiles = np.quantile(confidence, np.linspace(1.0, 0.0, count)) if len(confidence) else np.array([])
    return np.concatenate([[np.inf], np.unique(quantiles)[::-1]])


Outcome = Callable[[float], tuple[np.ndarray, ...]]


def threshold_outcome(confidence: np.ndarray, bad: np.ndarray) -> Outcome:
    """The plain gate's outcome: `tau -> (accepted, loss)` with accepted = confidence >= tau and loss = accepted and bad."""
    confidence, bad = np.asarray(confidence, dtype=np.float64), np.asarray(bad, dtype=bool)
    if confidence.shape != bad.shape:
        raise ShapeError(f"threshold_outcome: expected confidence and bad of one shape [N], got {confidence.shape} and {bad.shape}.")

    def outcome(tau: float) -> tuple[np.ndarray, np.ndarray]:
        accepted = confidence >= tau
        return accepted, accepted & bad

    return outcome


def learn_then_test(confidence: np.ndarray, outcome: Outcome, alpha: float, delta: float,
                    thresholds: np.ndarray | None = None) -> RiskControl:
    """Certify thresholds strictest first while the binomial test rejects R(tau) > alpha at level delta; return the last.

    Args:
        confidence: `[N]` gate statistic per calibration chunk; its quantiles are the default candidate thresholds.
        outcome: `tau -> (accepted [N], loss [N], ...)` bool arrays; the loss must not decrease as tau decreases
            (`threshold_outcome` for the plain gate).
        alpha: risk level in (0, 1).
        delta: failure probability of the guarantee in (0, 1).
        thresholds: candidates, strictest first (default `candidate_thresholds`).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    if confidence.ndim != 1:
        raise ShapeError(f"learn_then_test: expected confidence [N], got shape {confidence.shape}.")
    if not 0.0 < alpha < 1.0 or not 0.0 < delta < 1.0:
        raise ConfigError(f"learn_then_test: expected alpha and delta in (0, 1), got alpha={alpha}, delta={delta}.")
    if not np.isfinite(confidence).all():
        raise ShapeError("learn_then_test: expected finite confidences, got NaN or inf.")
    taus = candidate_thresholds(confidence) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if np.any(np.diff(taus) > 0):
        raise ConfigError("learn_then_test: expected thresholds in strictest-first (descending) order.")
    n = len(confidence)
    chosen, tested = math.inf, 0
    for tau in taus:
        losses = int(outcome(float(tau))[1].sum())
        tested += 1
        if binomial_cdf(losses, n, alpha) > delta:  # H0 "R(tau) > alpha" not rejected: stop the fixed sequence here
            break
        chosen = float(tau)
    accepted, loss = outcome(chosen)[:2]
    losses = int(loss.sum())
    return RiskControl(tau=chosen, alpha=alpha, delta=delta, n=n, coverage=float(accepted.mean()) if n else 0.0,
                       empirical_risk=losses / n if n else 0.0, upper_bound=binomial_upper_bound(losses, n, delta), tested=tested)
