"""Learn-then-Test on synthetic confidences whose true risk is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rsd.errors import ConfigError, ShapeError
from rsd.training.risk import binomial_cdf, binomial_upper_bound, learn_then_test, threshold_outcome

ALPHA, DELTA = 0.05, 0.1


def true_risk(tau: float) -> float:
    """R(tau) when confidence ~ U(0, 1) and P(bad | c) = 1 - c: the integral of (1 - c) over [tau, 1]."""
    tau = min(max(tau, 0.0), 1.0)
    return (1.0 - tau) ** 2 / 2.0


def sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    confidence = rng.uniform(0.0, 1.0, n)
    return confidence, rng.uniform(0.0, 1.0, n) < 1.0 - confidence


def naive_tau(confidence: np.ndarray, bad: np.ndarray, alpha: float) -> float:
    """The deliberately wrong rule: the smallest threshold whose *empirical* risk is at most alpha (no test)."""
    order = np.sort(confidence)[::-1]
    chosen = math.inf
    for tau in order:
        if ((confidence >= tau) & bad).mean() > alpha:
            break
        chosen = tau
    return chosen


def test_binomial_tail_and_bound_match_known_values():
    assert binomial_cdf(5, 10, 0.5) == pytest.approx(0.623046875, abs=1e-12)
    assert binomial_cdf(0, 20, 0.1) == pytest.approx(0.9**20, rel=1e-12)
    assert binomial_cdf(-1, 5, 0.3) == 0.0 and binomial_cdf(5, 5, 0.3) == 1.0
    bound = binomial_upper_bound(0, 100, 0.05)  # the rule of three: about 3 / n
    assert bound == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-6)


def test_guarantee_holds_and_the_naive_rule_breaks_it():
    rng = np.random.default_rng(0)
    trials, violations, naive_violations = 200, 0, 0
    for _ in range(trials):
        confidence, bad = sample(rng, 400)
        result = learn_then_test(confidence, threshold_outcome(confidence, bad), ALPHA, DELTA)
        violations += true_risk(result.tau) > ALPHA
        naive_violations += true_risk(naive_tau(confidence, bad, ALPHA)) > ALPHA
    assert violations / trials <= DELTA  # the certified tau respects the risk level in >= 1 - delta of the draws
    assert naive_violations / trials > 0.3  # picking tau on the empirical risk alone overshoots about half the time


def test_certified_threshold_is_useful_and_reported_consistently():
    confidence, bad = sample(np.random.default_rng(1), 5000)
    result = learn_then_test(confidence, threshold_outcome(confidence, bad), ALPHA, DELTA)
    oracle = 1.0 - math.sqrt(2 * ALPHA)  # R(oracle) = alpha
    assert oracle < result.tau < oracle + 0.08  # close to the best possible threshold with 5000 chunks
    assert result.coverage == pytest.approx((confidence >= result.tau).mean())
    assert result.empirical_risk <= ALPHA <= result.upper_bound + 0.02
    assert "0.90" in result.guarantee and "0.050" in result.guarantee


def test_nothing_certified_and_bad_input():
    confidence = np.linspace(0.0, 1.0, 50)
    all_bad = threshold_outcome(confidence, np.ones(50, dtype=bool))
    result = learn_then_test(confidence, all_bad, ALPHA, DELTA)
    assert math.isinf(result.tau) and result.coverage == 0.0 and result.tested == 2
    with pytest.raises(ShapeError):
        threshold_outcome(confidence, np.ones(49, dtype=bool))
    with pytest.raises(ConfigError, match="alpha"):
        learn_then_test(confidence, all_bad, 0.0, DELTA)
    with pytest.raises(ConfigError, match="strictest-first"):
        learn_then_test(confidence, all_bad, ALPHA, DELTA, thresholds=np.array([0.1, 0.5]))


def test_prefix_gate_certified_by_learn_then_test_meets_its_bound_on_fresh_chunks():
    """Partial acceptance through calibrate's own outcome (the runtime's rule): a step is bad with probability 1 - c
    for its confidence c ~ U(0, 1); the risk of the certified tau, measured on 50,000 fresh chunks, stays at or
    below alpha in at least 1 - delta of the calibration draws."""
    from rsd.runtime.gate import Gate
    from rsd.training.calibrate import DraftMeasurements, gate_outcome

    def draw(rng: np.random.Generator, n: int) -> DraftMeasurements:
        step = rng.uniform(0.0, 1.0, (n, 4))
        error = np.where(rng.uniform(0.0, 1.0, (n, 4)) < 1.0 - step, 2.0, 0.0)
        return DraftMeasurements(mean=step.mean(1), min=step.min(1), step=step, step_error=error, agreement=np.ones(n),
                                 episode=np.zeros(n, dtype=np.int64))

    rng = np.random.default_rng(5)
    gate = Gate(tau=math.inf, mode="prefix", statistic="step", min_steps=2)
    fresh = gate_outcome(draw(rng, 50_000), gate, tolerance=1.0)[1]
    trials, violations, accepted_steps = 40, 0, []
    for _ in range(trials):
        confidence, outcome = gate_outcome(draw(rng, 400), gate, tolerance=1.0)
        result = learn_then_test(confidence, outcome, ALPHA, DELTA)
        accepted, bad, steps = fresh(result.tau)
        violations += bad.mean() > ALPHA
        accepted_steps.append(steps[accepted].mean() if accepted.any() else 0.0)
    assert violations / trials <= DELTA
    assert 2.0 <= np.mean(accepted_steps) < 4.0  # prefixes of 2 or more steps, not whole chunks only
