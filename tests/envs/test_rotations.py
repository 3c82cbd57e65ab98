"""Quaternion maths: robosuite's quat2axisangle by hand, and the expert's short-way rotation vector built on it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rsd.envs.rotations import mat2quat, quat2axisangle, quat_conjugate, quat_multiply, rotation_vector, yaw, yaw_quat
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


def quat_matrix(q: np.ndarray) -> np.ndarray:
    """The rotation matrix of a unit quaternion (x, y, z, w), written out by hand."""
    x, y, z, w = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def test_mat2quat_inverts_the_matrix_of_every_rotation() -> None:
    """Random rotations and the half turns (trace -1), where the naive trace formula breaks down."""
    rng = np.random.default_rng(0)
    quats = [q / np.linalg.norm(q) for q in rng.normal(size=(500, 4))]
    quats += [np.array([1.0, 0.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0, 0.0]), np.array([0.6, 0.8, 0.0, 0.0])]
    for q in quats:
        got = mat2quat(quat_matrix(q))
        assert got[3] >= 0 and (np.allclose(got, q, atol=1e-9) or np.allclose(got, -q, atol=1e-9)), (q, got)
    yawed = quat_multiply(yaw_quat(0.4), quats[0])  # the expert's target: a yaw on top of the current orientation
    assert np.allclose(rotation_vector(quat_multiply(mat2quat(quat_matrix(yawed)), quat_conjugate(quats[0]))), [0.0, 0.0, 0.4])
    with pytest.raises(ShapeError):
        mat2quat(np.eye(4))

