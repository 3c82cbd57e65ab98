"""robosuite 1.4 tasks (Lift, Stack, PickPlaceCan) as rsd control-loop environments, with scripted experts.

`RobosuiteEnv` renders the chosen cameras (agentview, optionally robot0_eye_in_hand) and hands the policy the
contract's observation dict through the same plumbing as the LIBERO adapter (`rsd.envs.sim_common`): frames
rotated 180°, proprio = eef pos + axis-angle + gripper qpos (8). Actions are robosuite's OSC_POSE deltas in the
controller's own units (xyz and axis-angle in [-1, 1], gripper -1 open / +1 close), so demonstrations recorded
here are replayed unchanged. `RobosuiteExpert` is a waypoint script on the object poses read from the simulator
state; it solved 10 of 10 seeds on each task (tests/test_sim.py checks Lift). `generate_robosuite_demos` records
its successful episodes as a demonstration file (`rsd.data.hdf5` layout) for training.

Rendering needs an OpenGL backend without a display: `MUJOCO_GL=egl` (the default set here when the variable is
unset; Mesa's EGL renders on the CPU) or `MUJOCO_GL=osmesa` (Debian: `apt-get install libosmesa6`).

Usage:
    env = RobosuiteEnv("Lift", cameras=("agentview",), image_size=128)
    expert = RobosuiteExpert(env)
    obs = env.reset(seed=0); expert.reset()
    obs, reward, done, info = env.step(expert.act(obs))     # info["success"]
    summary = generate_robosuite_demos("Lift", episodes=50, out="runs/lift/demos.hdf5")
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from rsd.envs.sim_common import (
    EEF_POS_KEY,
    EEF_QUAT_KEY,
    ImagePipeline,
    build_observation,
    camera_key,
    check_action,
    numpy_seed,
    proprio_from_obs,
)
from rsd.errors import ConfigError, RsdError

CAMERAS = ("agentview", "robot0_eye_in_hand")


@dataclass(frozen=True)
class RobosuiteTask:
    """One robosuite task as rsd uses it: the environment class, its instruction and the episode length."""

    env_name: str  # robosuite environment class name (suite.make's first argument)
    instruction: str  # the language instruction handed to the policy
    max_steps: int  # policy steps before an episode is cut off (the expert needs at most about half)
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra suite.make arguments


TASKS: dict[str, RobosuiteTask] = {
    "Lift": RobosuiteTask("Lift", "lift the red cube", 150),
    "Stack": RobosuiteTask("Stack", "stack the red cube on the green cube", 300),
    "PickPlaceCan": RobosuiteTask(
        "PickPlace", "pick up the can and place it in the bin", 300, {"single_object_mode": 2, "object_type": "can"}
    ),
}


SIM_INSTALL_HINT = "pip install -e '.[sim]' (robosuite==1.4.0, mujoco>=3.3.7,<3.10, termcolor)"


def import_robosuite() -> ModuleType:
    """Import robosuite with a headless OpenGL backend (MUJOCO_GL=egl unless already set); clear error if unusable."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    # libtriton and Mesa's llvmpipe each carry their own LLVM: loading triton after mujoco has loaded Mesa segfaults
    # (seen with EGL and OSMesa), and torch loads it lazily (torchvision, torch.compile), so load it first.
    if importlib.util.find_spec("triton") is not None:
        importlib.import_module("triton")
    try:
        mujoco_version = importlib.metadata.version("mujoco")
        robosuite = importlib.import_module("robosuite")
    except (ModuleNotFoundError, importlib.metadata.PackageNotFoundError) as error:
        raise RsdError(f"robosuite adapter: expected robosuite 1.4 and mujoco to be importable, got {error}. Install: {SIM_INSTALL_HINT}.") from error
    if not (3, 3, 7) <= tuple(int(part) for part in mujoco_version.split(".")[:3]) < (3, 10):
        raise RsdError(f"robosuite adapter: expected mujoco >=3.3.7,<3.10 (robosuite 1.4 breaks on 3.10+), got {mujoco_version}. Install: {SIM_INSTALL_HINT}.")
    return robosuite


def get_task(name: str) -> RobosuiteTask:
    """The task called `name` (Lift, Stack or PickPlaceCan), else a ConfigError listing them."""
    if name not in TASKS:
        raise ConfigError(f"robosuite task: expected one of {sorted(TASKS)}, got {name!r}.")
    return TASKS[name]


class RobosuiteEnv:
    """A robosuite task behind rsd's env interface: `reset(seed) -> obs`, `step(action [7]) -> obs, r, done, info`.

    `done` is true on success (`info["success"]`) or after `max_steps` steps (`info["timeout"]`).
    `cameras=()` runs without a renderer (state only: the observation has no "image"; for experts and timing).
    """

    def __init__(
        self,
        task: str = "Lift",
        cameras: Sequence[str] = ("agentview",),
        image_size: int = 128,
        max_steps: int | None = None,
        control_freq: int = 20,
        robot: str = "Panda",
    ) -> None:
        self.task_name = task
        self.task = get_task(task)
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise ConfigError(f"RobosuiteEnv.cameras: expected names from {list(CAMERAS)}, got {list(cameras)}.")
        if max_steps is not None and max_steps <= 0:
            raise ConfigError(f"RobosuiteEnv.max_steps: expected None or an int > 0, got {max_steps}.")
        self.cameras = tuple(cameras)
        self.image_size = image_size
        self.max_steps = max_steps if max_steps is not None else self.task.max_steps
        self.instruction = self.task.instruction
        self.task_family = task
        # Frames are rendered at the policy's size, so the pipeline only rotates them (no JPEG, no resize).
        self.pipeline = ImagePipeline(size=image_size, rotate=True, jpeg=False)
        suite = import_robosuite()
        controllers = importlib.import_module("robosuite.controllers")
        render = bool(self.cameras)
        with numpy_seed(0):  # construction samples too (Lift's cube size): the same env in every process
            self._env = suite.make(
                self.task.env_name,
                robots=robot,
                controller_configs=controllers.load_controller_config(default_controller="OSC_POSE"),
                has_renderer=False,
                has_offscreen_renderer=render,
                use_camera_obs=render,
                camera_names=list(self.cameras) or "agentview",
                camera_heights=image_size,
                camera_widths=image_size,
                control_freq=control_freq,
                horizon=self.max_steps + 1,
                ignore_done=True,
                hard_reset=False,
                reward_shaping=False,
                **dict(self.task.env_kwargs),
            )
        self._raw: dict[str, Any] | None = None
        self._steps = 0

    @property
    def raw_env(self) -> Any:
        """The underlying robosuite environment (for experts and inspection)."""
        return self._env

    def reset(self, seed: int) -> dict[str, Any]:
        """Start an episode; `seed` fixes object placement (robosuite samples from numpy's global RNG).

        The global numpy RNG state is restored afterwards, so callers' random streams are not disturbed.
        """
        with numpy_seed(seed):
            self._raw = self._env.reset()
        self._steps = 0
        return self._observation()

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, dict[str, Any]]:
        """Apply one OSC_POSE action `[7]` (controller units); return obs, reward, done, info."""
        if self._raw is None:
            raise RsdError("RobosuiteEnv.step: expected reset() before step(), got a step on an unstarted episode.")
        command = check_action(action)
        self._raw, reward, _, _ = self._env.step(command)
        self._steps += 1
        success = bool(self._env._check_success())
        timeout = self._steps >= self.max_steps and not success
        info = {"success": success, "timeout": timeout, "step": self._steps}
        return self._observation(), float(reward), success or timeout, info

    def render(self) -> np.ndarray:
        """The first camera's current frame as the policy sees it, uint8 `[S, S, 3]`."""
        if self._raw is None:
            raise RsdError("RobosuiteEnv.render: expected reset() first, got no current frame.")
        if not self.cameras:
            raise RsdError("RobosuiteEnv.render: this env was built with cameras=() (no renderer); pass cameras.")
        return self.pipeline(self._raw[camera_key(self.cameras[0])])

    def close(self) -> None:
        """Free the simulator and its rendering context."""
        self._env.close()

    def _observation(self) -> dict[str, Any]:
        assert self._raw is not None
        if self.cameras:
            return build_observation(self._raw, self.cameras, self.pipeline, self.instruction)
        return {"instruction": self.instruction, "proprio": proprio_from_obs(self._raw)}

    # --- simulator state for scripted experts -------------------------------------------------------------------
    def eef_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """End-effector position `[3]` and quaternion `[4]` (x, y, z, w) from the last observation."""
        if self._raw is None:
            raise RsdError("RobosuiteEnv.eef_pose: expected reset() first.")
        return np.array(self._raw[EEF_POS_KEY], dtype=np.float64), np.array(self._raw[EEF_QUAT_KEY], dtype=np.float64)

    def body_pose(self, body_id: int) -> tuple[np.ndarray, np.ndarray]:
        """World position `[3]` and quaternion `[4]` (x, y, z, w) of a simulator body."""
        data = self._env.sim.data
        w, x, y, z = (float(v) for v in data.body_xquat[body_id])
        return np.array(data.body_xpos[body_id], dtype=np.float64), np.array([x, y, z, w])


# --- scripted expert ------------------------------------------------------------------------------------------------
def _quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
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


def _quat_conjugate(q: np.ndarray) -> np.ndarray:
    return np.array([-q[0], -q[1], -q[2], q[3]])


def _quat_to_rotvec(q: np.ndarray) -> np.ndarray:
    """Rotation vector (axis * angle) of a unit quaternion, taking the short way round."""
    q = q / np.linalg.norm(q)
    if q[3] < 0:
        q = -q
    sin_half = np.linalg.norm(q[:3])
    if sin_half < 1e-9:
        return np.zeros(3)
    return q[:3] / sin_half * 2.0 * np.arctan2(sin_half, q[3])


def _yaw(q: np.ndarray) -> float:
    """Rotation about the world z axis of a quaternion (x, y, z, w)."""
    x, y, z, w = q
    return float(np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z)))


def _yaw_quat(angle: float) -> np.ndarray:
    return np.array([0.0, 0.0, np.sin(angle / 2.0), np.cos(angle / 2.0)])


class RobosuiteExpert:
    """Waypoint expert: above the object, down, close, lift; then (Stack, PickPlaceCan) carry, lower, release.

    Object and goal poses come from the simulator state each step; a proportional law turns the waypoint into
    an OSC_POSE action (gains per metre and per radian, saturated at the controller's [-1, 1]). Cubes are
    grasped with the gripper's yaw aligned to the cube's faces. Each phase has a step budget, so a waypoint
    that the arm cannot reach exactly (steady-state sag under load) does not stall the script.
    """

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
            if self.env.task_name == "PickPlaceCan":
                self._target_quat = quat.copy()
            else:  # turn about z by the smallest angle that lines the fingers up with a pair of cube faces
                delta = (_yaw(obj_quat) - _yaw(quat) + np.pi / 4) % (np.pi / 2) - np.pi / 4
                self._target_quat = _quat_multiply(_yaw_quat(delta), quat)
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
        rotation = _quat_to_rotvec(_quat_multiply(self._target_quat, _quat_conjugate(quat)))
        action[3:6] = np.clip(rotation * self.rotation_gain, -1.0, 1.0)  # 1.0 = 0.5 rad per step
        action[6] = grip
        return action


def make_robosuite_env(task: str, **kwargs: Any) -> RobosuiteEnv:
    """Registry factory for `robosuite:<task>` (kwargs: cameras, image_size, max_steps, control_freq, robot)."""
    known = {"cameras", "image_size", "max_steps", "control_freq", "robot"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"robosuite:{task}: expected options from {sorted(known)}, got unknown {unknown}.")
    return RobosuiteEnv(task, **kwargs)


def generate_robosuite_demos(
    task: str,
    episodes: int,
    out: str | Path,
    seed: int = 0,
    image_size: int = 128,
    progress: bool = True,
    cameras: Sequence[str] = ("agentview",),
    noise: float = 0.0,
) -> dict[str, Any]:
    """Run the scripted expert on seeds `seed .. seed + episodes - 1`, write the successful episodes to `out`.

    Each kept episode holds the frames `[T, S, S, 3]` per camera, proprio `[T, 8]` and actions `[T, 7]` seen before
    each step. Returns counts and speed; `steps` counts every simulated step, failed episodes included.
    """
    if episodes <= 0:
        raise ConfigError(f"generate_robosuite_demos.episodes: expected an int > 0, got {episodes}.")
    if not cameras:
        raise ConfigError("generate_robosuite_demos.cameras: expected at least one camera (demos store frames), got none.")
    from rsd.data.demos import record_demos

    env = RobosuiteEnv(task, cameras=cameras, image_size=image_size)
    summary = record_demos(env, RobosuiteExpert(env), range(seed, seed + episodes), out, f"robosuite:{task}",
                           {"cameras": list(env.cameras), "image_size": image_size}, env.cameras, progress, noise)
    env.close()
    return summary
