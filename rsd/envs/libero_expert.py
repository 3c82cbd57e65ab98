"""A scripted expert for LIBERO's pick-and-place tasks (libero_spatial, libero_object), reading poses from the simulator.

The task's BDDL goal names what moves and where to (`(On akita_black_bowl_1 plate_1)`,
`(In alphabet_soup_1 basket_1_contain_region)`). Each episode the expert measures both from the simulator state
(collision geoms of the object's body: footprint, top and bottom) and runs a waypoint script with LIBERO's OSC_POSE
controller: above the grasp point, down, close, lift, carry over the target, lower, open, retreat. Objects narrower
than the open gripper are grasped across their narrow side at their centre; wider ones (the bowls) by the rim, one
finger inside the bowl and one outside, on the rim side that clears the neighbouring objects best. A proportional
law turns each waypoint into a delta action (saturated at the controller's [-1, 1]: 5 cm and 0.5 rad per step);
every phase has a step budget, so a waypoint the arm cannot reach exactly does not stall the script.

Actions are in the units `LiberoEnv.step` takes by default (OpenVLA's LIBERO units: xyz and axis-angle deltas in
[-1, 1], gripper 1 = open, 0 = close), so recorded demonstrations train a policy that `rsd eval` runs unchanged.

Usage:
    env = LiberoEnv("libero_spatial", task_id=0, cameras=())   # state only: no rendering
    expert = LiberoExpert(env)
    obs = env.reset(seed=0); expert.reset()
    obs, reward, done, info = env.step(expert.act(obs))         # info["success"]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from rsd.envs.rotations import mat2quat, quat_conjugate, quat_multiply, rotation_vector, yaw_quat
from rsd.errors import ConfigError, RsdError

GRIP_SITE = "gripper0_grip_site"
FINGER_BODIES = ("gripper0_leftfinger", "gripper0_rightfinger")
MAX_GRASP_WIDTH = 0.065  # objects narrower than this (along some horizontal axis) are grasped across it
RIM_INSET = 0.012  # rim grasp: distance of the grasp point inside the object's outer radius
RIM_DEPTH = 0.02  # rim grasp: fingertips this far below the rim
CLEARANCE = 0.08  # height of the approach point above the grasp point, and of the carried object over obstacles
PLACE_DROP = 0.015  # the held object's bottom ends this far above the target surface before release
COMFORT_REACH = 0.72  # horizontal distance from the robot's base beyond which grasp points are penalised
LIFTED = 0.03  # the object must rise this much with the gripper, else the grasp is retried


@dataclass(frozen=True)
class Footprint:
    """An object's extent in the world from its collision geoms: horizontal points `[N, 2]`, bottom and top z."""

    points: np.ndarray  # [N, 2] corner points of the geoms' boxes projected on the table
    bottom: float  # lowest z
    top: float  # highest z

    @property
    def center(self) -> np.ndarray:
        """Centre `[2]` of the horizontal bounding box."""
        return (self.points.min(axis=0) + self.points.max(axis=0)) / 2.0

    def width_along(self, direction: np.ndarray) -> float:
        """Extent along a horizontal unit vector `[2]`."""
        projected = self.points @ direction
        return float(projected.max() - projected.min())


class LiberoExpert:
    """Waypoint expert for LIBERO tasks whose goal is one `On`/`In` predicate: move one object onto/into a target.

    `act(obs)` returns an action `[7]` in `LiberoEnv`'s default units (gripper 1 open, 0 closed).
    """

    GRASP_STEPS = 15  # steps with the gripper closing before lifting
    RELEASE_STEPS = 12  # steps with the gripper opening before retreating
    PHASE_BUDGET = 60  # at most this many steps in any waypoint phase
    RETRIES = 1  # grasps tried again after the object failed to rise

    def __init__(self, env: Any, gain: float = 20.0, rotation_gain: float = 2.0) -> None:
        if not hasattr(env, "raw_env") or not hasattr(env, "map_gripper"):
            raise ConfigError(f"LiberoExpert: expected a LiberoEnv, got {type(env).__name__}.")
        if not env.map_gripper:
            raise ConfigError("LiberoExpert: expected a LiberoEnv with map_gripper=True (the policy's units), got map_gripper=False.")
        self.env = env
        self.gain = gain
        self.rotation_gain = rotation_gain
        self.reset()

    # --- simulator state --------------------------------------------------------------------------------------------
    @property
    def _sim(self) -> Any:
        return self.env.raw_env.sim

    def _goal(self) -> tuple[str, str, str]:
        """`(predicate, object, target)` of the task's single goal predicate."""
        goal = self.env.raw_env.parsed_problem["goal_state"]
        if len(goal) != 1 or len(goal[0]) != 3 or goal[0][0].lower() not in ("on", "in"):
            raise RsdError(f"LiberoExpert: expected a goal with one On/In predicate, got {goal} for {self.env.task_family}.")
        predicate, obj, target = goal[0]
        return predicate.lower(), obj, target

    def _body_geoms(self, body: int) -> list[int]:
        """Collision geoms of a body and its descendants."""
        model = self._sim.model._model
        geoms = []
        for geom in range(model.ngeom):
            owner = int(model.geom_bodyid[geom])
            while owner not in (0, body):
                owner = int(model.body_parentid[owner])
            if owner == body and (model.geom_contype[geom] or model.geom_conaffinity[geom]):
                geoms.append(geom)
        return geoms

    def _footprint(self, geoms: list[int]) -> Footprint:
        """World extent of a set of geoms from their local bounding boxes."""
        model, data = self._sim.model._model, self._sim.data._data
        corners = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).T.reshape(-1, 3)
        points = []
        for geom in geoms:
            box = model.geom_aabb[geom]
            local = box[:3] + corners * box[3:]
            points.append(data.geom_xpos[geom] + local @ data.geom_xmat[geom].reshape(3, 3).T)
        every = np.concatenate(points)
        return Footprint(every[:, :2], float(every[:, 2].min()), float(every[:, 2].max()))

    def _object_body(self, name: str) -> int:
        bodies = self.env.raw_env.obj_body_id
        if name not in bodies:
            raise RsdError(f"LiberoExpert: expected object {name!r} in the scene, got {sorted(bodies)}.")
        return int(bodies[name])

    def _target(self, target: str) -> tuple[np.ndarray, float]:
        """Where the object goes: the target's centre `[2]` and the height of its top surface."""
        raw = self.env.raw_env
        if target in raw.obj_body_id:
            footprint = self._footprint(self._geoms[target])
            return footprint.center, footprint.top
        sites = getattr(raw, "object_sites_dict", {})
        if target in sites:  # a region of an object, e.g. basket_1_contain_region
            site_id = self._sim.model.site_name2id(target)
            center = np.array(self._sim.data.site_xpos[site_id][:2])
            parent = sites[target].parent_name
            return center, self._footprint(self._geoms[parent]).top
        raise RsdError(f"LiberoExpert: expected target {target!r} to be an object or object region, got neither.")

    def _grip(self) -> tuple[np.ndarray, np.ndarray]:
        """Grip-site position `[3]` and orientation quaternion (x, y, z, w) (what the OSC controller moves)."""
        site = self._sim.model.site_name2id(GRIP_SITE)
        return np.array(self._sim.data.site_xpos[site]), mat2quat(np.array(self._sim.data.site_xmat[site]).reshape(3, 3))

    def _finger_axis(self) -> np.ndarray:
        """Horizontal unit vector `[2]` along which the fingers close."""
        left, right = (np.array(self._sim.data.body_xpos[self._sim.model.body_name2id(name)]) for name in FINGER_BODIES)
        axis = (right - left)[:2]
        return axis / np.linalg.norm(axis)

    # --- planning ---------------------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> None:
        """Start a new episode's script (`seed` is unused: the script adds no noise; the env's reset fixes the scene)."""
        self._phase = "plan"
        self._in_phase = 0
        self._retries = 0
        self._object_z = 0.0
        self._geoms: dict[str, list[int]] = {}
        self._target_quat: np.ndarray | None = None
        self._grasp = np.zeros(3)
        self._offset = np.zeros(3)
        self._carry_z = 0.0

    def _plan(self) -> None:
        """Choose the grasp point and gripper yaw from the scene as it is now (after the settle steps)."""
        raw = self.env.raw_env
        for name, body in raw.obj_body_id.items():
            self._geoms[name] = self._body_geoms(int(body))
        _, obj, target = self._goal()
        self._object = obj
        self._target_name = target
        footprint = self._footprint(self._geoms[obj])
        center = footprint.center
        axes = [np.array([np.cos(a), np.sin(a)]) for a in np.linspace(0.0, np.pi, 12, endpoint=False)]
        widths = [footprint.width_along(a) for a in axes]
        narrow = int(np.argmin(widths))
        others = [self._footprint(g) for name, g in self._geoms.items() if name != obj]
        base = np.array(self._sim.data.body_xpos[self._sim.model.body_name2id("robot0_base")][:2])
        if widths[narrow] < MAX_GRASP_WIDTH:  # across the narrow side, at the centre
            close_axis = axes[narrow]
            point = center
            height = footprint.top - footprint.bottom
            grasp_z = footprint.top - min(0.03, 0.5 * height)
        else:  # by the rim: the side whose outer finger has most room
            radius = 0.5 * max(widths)
            best, best_room = None, -np.inf
            for angle in np.linspace(0.0, 2 * np.pi, 16, endpoint=False):
                direction = np.array([np.cos(angle), np.sin(angle)])
                outer = center + (radius + 0.02) * direction
                room = min((self._distance_to(outer, other) for other in others if other.top > footprint.top - 0.06), default=1.0)
                reach = np.linalg.norm(center + radius * direction - base)
                room = min(room, 0.05) - 0.5 * max(0.0, reach - COMFORT_REACH) - 0.01 * abs(np.sin(angle))  # ties: least yaw
                if room > best_room:
                    best, best_room = direction, room
            assert best is not None
            close_axis = best
            point = center + (radius - RIM_INSET) * best
            grasp_z = footprint.top - RIM_DEPTH
        self._grasp = np.array([point[0], point[1], grasp_z])
        finger = self._finger_axis()
        yaw = np.arctan2(close_axis[1], close_axis[0]) - np.arctan2(finger[1], finger[0])
        yaw = (yaw + np.pi / 2) % np.pi - np.pi / 2  # the gripper is symmetric: turn by at most 90°
        _, quat = self._grip()
        self._target_quat = quat_multiply(yaw_quat(yaw), quat)
        _, target_top = self._target(target)
        obstacles = max((other.top for other in others), default=footprint.top)
        self._carry_z = max(self._grasp[2] + CLEARANCE, target_top + (footprint.top - footprint.bottom) + CLEARANCE,
                            min(obstacles, self._grasp[2] + 0.2) + 0.02)

    @staticmethod
    def _distance_to(point: np.ndarray, footprint: Footprint) -> float:
        """Distance `[2]` from a point to a footprint's axis-aligned bounding box (0 inside)."""
        low, high = footprint.points.min(axis=0), footprint.points.max(axis=0)
        return float(np.linalg.norm(np.maximum(np.maximum(low - point, point - high), 0.0)))

    def _advance(self, phase: str) -> None:
        self._phase = phase
        self._in_phase = 0

    def _over_budget(self) -> bool:
        return self._in_phase > self.PHASE_BUDGET

    # --- control ----------------------------------------------------------------------------------------------------
    def act(self, obs: Mapping[str, Any] | None = None) -> np.ndarray:
        """The next action `[7]` (xyz and rotation deltas in [-1, 1], gripper 1 open / 0 closed); the sim state is read."""
        if self._phase == "plan":
            self._plan()
            self._advance("above")
        eef, quat = self._grip()
        obj = np.array(self._sim.data.body_xpos[self._object_body(self._object)])
        self._in_phase += 1
        closed = False
        target = eef

        if self._phase == "above":
            target = self._grasp + np.array([0.0, 0.0, CLEARANCE])
            if eef[2] < target[2] - 0.03:  # rise first, then move sideways
                target = np.array([eef[0], eef[1], target[2]])
            elif np.linalg.norm(target - eef) < 0.01 or self._over_budget():
                self._advance("descend")
        if self._phase == "descend":
            target = self._grasp
            if np.linalg.norm(target - eef) < 0.008 or self._over_budget():
                self._advance("grasp")
        if self._phase == "grasp":
            target, closed = self._grasp, True
            if self._in_phase > self.GRASP_STEPS:
                self._offset = eef - obj
                self._object_z = float(obj[2])
                self._advance("lift")
        if self._phase == "lift":
            closed = True
            target = np.array([eef[0], eef[1], self._carry_z])
            if eef[2] > self._carry_z - 0.02 or self._over_budget():
                if obj[2] - self._object_z < LIFTED and self._retries < self.RETRIES:  # missed: open and plan again
                    self._retries += 1
                    self._advance("reopen")
                else:
                    self._advance("carry")
        if self._phase == "reopen":
            target = eef
            if self._in_phase > self.RELEASE_STEPS:
                self._plan()
                self._advance("above")
                target = eef
        if self._phase == "carry":
            closed = True
            center, _ = self._target(self._target_name)
            target = np.array([center[0] + self._offset[0], center[1] + self._offset[1], self._carry_z])
            if np.linalg.norm((target - eef)[:2]) < 0.006 or self._over_budget():
                self._advance("lower")
        if self._phase == "lower":
            closed = True
            center, top = self._target(self._target_name)
            held = self._footprint(self._geoms[self._object])
            drop = max(held.bottom - (top + PLACE_DROP), 0.0)  # never upwards
            target = np.array([center[0] + self._offset[0], center[1] + self._offset[1], eef[2] - drop])
            if drop < 0.005 or self._over_budget():
                self._advance("release")
        if self._phase == "release":
            target = eef
            if self._in_phase > self.RELEASE_STEPS:
                self._advance("retreat")
        if self._phase == "retreat":
            target = eef + np.array([0.0, 0.0, 0.05])

        action = np.zeros(7)
        action[:3] = np.clip((target - eef) * self.gain, -1.0, 1.0)
        assert self._target_quat is not None
        action[3:6] = np.clip(rotation_vector(quat_multiply(self._target_quat, quat_conjugate(quat))) * self.rotation_gain, -1.0, 1.0)
        action[6] = 0.0 if closed else 1.0
        return action
