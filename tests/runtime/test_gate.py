"""The gate: validation, the acceptance rule on known confidences, and reading it from new and old manifests."""

from __future__ import annotations

import math

import pytest
import torch

from rsd.errors import CheckpointError, ConfigError, ShapeError
from rsd.runtime.gate import Gate, step_confidence

STEP = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.5, 0.9, 0.9, 0.9], [0.9, 0.9, 0.9, 0.9]])  # [B=3, H=4]
MEAN = torch.tensor([0.75, 0.8, 0.9])
MIN = torch.tensor([0.6, 0.5, 0.9])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tau": -0.1}, "tau"),
        ({"tau": math.nan}, "tau"),
        ({"tau": "0.5"}, "tau"),
        ({"tau": True}, "tau"),
        ({"tau": 0.5, "mode": "steps"}, "mode"),
        ({"tau": 0.5, "mode": "chunk", "statistic": "step"}, r"\('mean', 'min'\)"),
        ({"tau": 0.5, "mode": "prefix", "statistic": "mean"}, r"\('step',\)"),
        ({"tau": 0.5, "mode": "prefix", "statistic": "step", "min_steps": 0}, "min_steps"),
        ({"tau": 0.5, "min_steps": 2.0}, "min_steps"),
        ({"tau": 0.5, "max_steps": 4}, "max_steps: expected None in chunk mode"),
        ({"tau": 0.5, "mode": "prefix", "statistic": "step", "min_steps": 4, "max_steps": 3}, "max_steps: expected None or an int >= min_steps 4"),
        ({"tau": 0.5, "mode": "prefix", "statistic": "step", "max_steps": 2.0}, "max_steps"),
        ({"tau": 0.5, "layers": 0}, "layers"),
        ({"tau": 0.5, "layers": True}, "layers"),
    ],
)
def test_invalid_gates_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        Gate(**fields)


def test_tau_is_stored_as_float_and_inf_is_allowed():
    assert Gate(tau=1).tau == 1.0 and isinstance(Gate(tau=1).tau, float)
    assert math.isinf(Gate().tau) and Gate(tau=math.inf).mode == "chunk"


def test_chunk_gate_accepts_all_or_nothing():
    mean_gate = Gate(tau=0.8, statistic="mean")
    assert mean_gate.accepted_steps(MEAN, MIN, STEP).tolist() == [0, 4, 4]
    assert Gate(tau=0.8, statistic="min").accepted_steps(MEAN, MIN, STEP).tolist() == [0, 0, 4]
    assert torch.equal(mean_gate.statistic_of(MEAN, MIN, STEP), MEAN)


def test_prefix_gate_accepts_the_confident_leading_run_if_long_enough():
    gate = Gate(tau=0.7, mode="prefix", statistic="step", min_steps=2)
    assert gate.accepted_steps(MEAN, MIN, STEP).tolist() == [3, 0, 4]  # row 1 fails at its first step
    assert Gate(tau=0.7, mode="prefix", statistic="step", min_steps=4).accepted_steps(MEAN, MIN, STEP).tolist() == [0, 0, 4]
    assert gate.statistic_of(MEAN, MIN, STEP).tolist() == pytest.approx([0.8, 0.5, 0.9])  # min of the first min_steps


def test_max_steps_caps_the_accepted_run_at_the_executed_steps():
    capped = Gate(tau=0.7, mode="prefix", statistic="step", min_steps=2, max_steps=2)
    assert capped.accepted_steps(MEAN, MIN, STEP).tolist() == [2, 0, 2]
    exact = Gate(tau=0.75, mode="prefix", statistic="step", min_steps=2, max_steps=2)  # row 0's third step (0.7) no longer matters
    assert exact.accepted_steps(MEAN, MIN, STEP).tolist() == [2, 0, 2]
    assert Gate(tau=0.75, mode="prefix", statistic="step", min_steps=3).accepted_steps(MEAN, MIN, STEP).tolist() == [0, 0, 4]
    assert Gate(tau=0.0, mode="prefix", statistic="step", min_steps=1, max_steps=3).accepted_steps(MEAN, MIN, STEP).tolist() == [3, 3, 3]


def test_tau_zero_accepts_everything_in_full_and_inf_nothing():
    for gate in (Gate(tau=0.0, statistic="min"), Gate(tau=0.0, mode="prefix", statistic="step", min_steps=4)):
        assert gate.accepted_steps(MEAN, MIN, STEP).tolist() == [4, 4, 4]
    for gate in (Gate(tau=math.inf), Gate(tau=math.inf, mode="prefix", statistic="step")):
        assert gate.accepted_steps(MEAN, MIN, STEP).tolist() == [0, 0, 0]


def test_accepted_steps_checks_shapes():
    with pytest.raises(ShapeError, match=r"step \[B, H\]"):
        Gate(tau=0.5).accepted_steps(MEAN, MIN, STEP[0])
    with pytest.raises(ShapeError, match="mean"):
        Gate(tau=0.5).accepted_steps(MEAN[:2], MIN, STEP)


def test_step_confidence_is_the_min_over_layers_and_latent_dims_of_each_step():
    top = torch.ones(1, 3, 2 * 4)  # C = 3 layers, H = 2 steps, d = 4
    top[0, 2, 5] = 0.3  # layer 2, step 1, latent 1
    top[0, 0, 0] = 0.6  # layer 0, step 0, latent 0
    assert step_confidence(top, chunk_len=2, latent_dim=4).tolist() == [[pytest.approx(0.6), pytest.approx(0.3)]]
    with pytest.raises(ShapeError, match=r"\[B, C, 8\]"):
        step_confidence(top[..., :6], chunk_len=2, latent_dim=4)


def test_confidences_read_only_the_coarsest_layers_named():
    top = torch.ones(1, 3, 2 * 4)  # C = 3 layers, H = 2 steps, d = 4
    top[0, 0, 1] = 0.8  # layer 0, step 0
    top[0, 2, 5] = 0.3  # layer 2, step 1: a fine layer
    mean, minimum, step = Gate(tau=0.5).confidences(top, chunk_len=2, latent_dim=4)
    assert minimum.tolist() == [pytest.approx(0.3)] and step.tolist() == [[pytest.approx(0.8), pytest.approx(0.3)]]
    assert mean.tolist() == [pytest.approx((24 - 0.2 - 0.7) / 24)]
    mean, minimum, step = Gate(tau=0.5, layers=1).confidences(top, chunk_len=2, latent_dim=4)
    assert minimum.tolist() == [pytest.approx(0.8)] and step.tolist() == [[pytest.approx(0.8), 1.0]]
    assert mean.tolist() == [pytest.approx((8 - 0.2) / 8)]
    with pytest.raises(ShapeError, match=r"C >= 4"):
        Gate(tau=0.5, layers=4).confidences(top, chunk_len=2, latent_dim=4)


def test_gate_round_trips_and_old_fields_fall_back_to_a_chunk_gate():
    gate = Gate(tau=0.62, mode="prefix", statistic="step", min_steps=3)
    assert Gate.from_json({"gate": gate.to_json()}, "m.json") == gate
    old = Gate.from_json({"tau": 0.25, "gate_statistic": "min"}, "old.json")
    assert old == Gate(tau=0.25, mode="chunk", statistic="min")
    assert "prefix gate, tau 0.6200 on the step confidence, at least 3 steps" == gate.describe()
    assert gate.max_steps is None and Gate.from_json({"gate": {k: v for k, v in gate.to_json().items() if k != "max_steps"}}, "m.json") == gate
    capped = Gate(tau=0.62, mode="prefix", statistic="step", min_steps=3, max_steps=5)
    assert Gate.from_json({"gate": capped.to_json()}, "m.json") == capped
    assert capped.describe().endswith("at least 3 steps, at most 5")
    assert Gate(tau=0.5, mode="prefix", statistic="step", min_steps=4, max_steps=4).describe().endswith("confidence, 4 steps")
    coarsest = Gate(tau=0.5, statistic="min", layers=1)
    assert Gate.from_json({"gate": coarsest.to_json()}, "m.json", coarse_layers=3) == coarsest
    assert coarsest.describe() == "chunk gate, tau 0.5000 on the min confidence of the coarsest 1 layer"
    with pytest.raises(CheckpointError, match="at most the draft's 3 coarse layers, got layers 4"):
        Gate.from_json({"gate": Gate(tau=0.5, layers=4).to_json()}, "m.json", coarse_layers=3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "found neither"),
        ({"gate": 0.5}, "expected \"gate\" to be an object"),
        ({"gate": {"tau": -1.0, "mode": "chunk", "statistic": "mean", "min_steps": 1}}, "valid gate.*tau"),
        ({"gate": {"tau": 0.5, "mode": "chunk", "statistic": "mean", "min_steps": 1, "beta": 2}}, "valid gate"),
        ({"tau": math.nan, "gate_statistic": "mean"}, "valid gate.*tau"),
        ({"tau": 0.5, "gate_statistic": "median"}, "valid gate.*statistic"),
    ],
)
def test_invalid_gate_in_a_file_is_a_checkpoint_error(data, message):
    with pytest.raises(CheckpointError, match=message):
        Gate.from_json(data, "bundle/manifest.json")


def test_prefix_gate_longer_than_the_chunk_is_refused_on_load():
    data = {"gate": Gate(tau=0.5, mode="prefix", statistic="step", min_steps=9).to_json()}
    with pytest.raises(CheckpointError, match="at most the chunk length 8, got 9 and None"):
        Gate.from_json(data, "bundle/manifest.json", chunk_len=8)
    data = {"gate": Gate(tau=0.5, mode="prefix", statistic="step", min_steps=2, max_steps=9).to_json()}
    with pytest.raises(CheckpointError, match="at most the chunk length 8, got 2 and 9"):
        Gate.from_json(data, "bundle/manifest.json", chunk_len=8)
