"""Quaternion maths of the simulator adapters and experts (quaternions are (x, y, z, w), as robosuite stores them).

Usage:
    axis_angle = quat2axisangle(raw_obs["robot0_eef_quat"])                     # [3], as robosuite computes it
    quat = mat2quat(sim.data.site_xmat[site].reshape(3, 3))                     # a MuJoCo frame's orientation
    error = rotation_vector(quat_multiply(target, quat_conjugate(current)))     # [3], the short way round
"""

from __future__ import annotations

import math

import numpy as np

from rsd.errors import ShapeError


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """Quaternion (x, y, z, w) -> axis-angle `[3]` (unit axis times angle in radians), as robosuite computes it."""
    q = np.asarray(quat, dtype=np.float64)
    if q.shape != (4,):
        raise ShapeError(f"quat2axisangle: expected a quaternion [4] (x, y, z, w), got shape {q.shape}.")
    w = float(np.clip(q[3], -1.0, 1.0))
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * math.acos(w) / den


def mat2quat(matrix: np.ndarray) -> np.ndarray:
    """Rotation matrix `[3, 3]` -> unit quaternion (x, y, z, w) with w >= 0 (Shepperd's method: stable for every angle)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (3, 3):
        raise ShapeError(f"mat2quat: expected a rotation matrix [3, 3], got shape {m.shape}.")
    trace = float(np.trace(m))
    largest = int(np.argmax([m[0, 0], m[1, 1], m[2, 2], trace]))
    if largest == 3:
        w = math.sqrt(1.0 + trace) / 2.0
        q = np.array([(m[2, 1] - m[1, 2]) / (4 * w), (m[0, 2] - m[2, 0]) / (4 * w), (m[1, 0] - m[0, 1]) / (4 * w), w])
    else:
        i, j, k = largest, (largest + 1) % 3, (largest + 2) % 3
        r = math.sqrt(max(1.0 + m[i, i] - m[j, j] - m[k, k], 0.0)) / 2.0
        q = np.empty(4)
        q[i], q[j], q[k], q[3] = r, (m[j, i] + m[i, j]) / (4 * r), (m[k, i] + m[i, k]) / (4 * r), (m[k, j] - m[j, k]) / (4 * r)
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of quaternions (x, y, z, w)."""
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ]
    )


def quat_conjugate(q: np.ndarray) -> np.ndarray:
    """Conjugate (the inverse rotation) of a unit quaternion (x, y, z, w)."""
    return np.array([-q[0], -q[1], -q[2], q[3]])


def rotation_vector(q: np.ndarray) -> np.ndarray:
    """Rotation vector (axis * angle) of a quaternion (x, y, z, w), normalised first and taking the short way round."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q)
    return quat2axisangle(-q if q[3] < 0 else q)


def yaw(q: np.ndarray) -> float:
    """Rotation about the world z axis of a quaternion (x, y, z, w)."""
    x, y, z, w = q
    return float(np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z)))


def yaw_quat(angle: float) -> np.ndarray:
    """The quaternion (x, y, z, w) of a rotation by `angle` radians about the world z axis."""
    return np.array([0.0, 0.0, np.sin(angle / 2.0), np.cos(angle / 2.0)])


def face_yaw_offset(cube: np.ndarray, gripper: np.ndarray) -> float:
    """The smallest turn about z, in [-pi/4, pi/4), that lines a gripper's fingers up with a pair of a cube's faces
    (both quaternions x, y, z, w)."""
    return (yaw(cube) - yaw(gripper) + np.pi / 4) % (np.pi / 2) - np.pi / 4
