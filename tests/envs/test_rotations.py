"""Quaternion maths: robosuite's quat2axisangle by hand, and the expert's short-way rotation vector built on it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rsd.envs.rotations import quat2axisangle, quat_conjugate, quat_multiply, rotation_vector, yaw, yaw_quat
from rsd.errors import ShapeError


def test_quat2axisangle() -> None:
    assert quat2axisangle(np.array([0.0, 0.0, 0.0, 1.0])).tolist() == [0.0, 0.0, 0.0]
    half = math.sqrt(0.5)
    assert np.allclose(quat2axisangle(np.array([0.0, 0.0, half, half])), [0.0, 0.0, math.pi / 2])
    with pytest.raises(ShapeError):
        quat2axisangle(np.zeros(3))


def test_rotation_vector_takes_the_short_way_and_ignores_scale() -> None:
    q = yaw_quat(0.3)
    assert np.allclose(rotation_vector(q), [0.0, 0.0, 0.3])
    assert np.allclose(rotation_vector(-q), [0.0, 0.0, 0.3])  # the same rotation, the other hemisphere
    assert np.allclose(rotation_vector(3.0 * q), [0.0, 0.0, 0.3])
    assert rotation_vector(np.array([0.0, 0.0, 0.0, 1.0])).tolist() == [0.0, 0.0, 0.0]


def test_rotation_vector_matches_the_atan2_form_on_random_rotations() -> None:
    rng = np.random.default_rng(0)
    for q in rng.normal(size=(200, 4)):
        unit = q / np.linalg.norm(q)
        unit = -unit if unit[3] < 0 else unit
        sin_half = np.linalg.norm(unit[:3])
        expected = unit[:3] / sin_half * 2.0 * np.arctan2(sin_half, unit[3])
        assert np.allclose(rotation_vector(q), expected, atol=1e-12)


def test_products_yaw_and_inverse() -> None:
    a, b = yaw_quat(0.2), yaw_quat(0.5)
    assert math.isclose(yaw(quat_multiply(a, b)), 0.7, abs_tol=1e-12)
    assert np.allclose(quat_multiply(a, quat_conjugate(a)), [0.0, 0.0, 0.0, 1.0])
