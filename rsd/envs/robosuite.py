"""robosuite 1.4 tasks (Lift, Stack, PickPlaceCan) as rsd control-loop environments.

`RobosuiteEnv` renders the chosen cameras (agentview, optionally robot0_eye_in_hand) and hands the policy the
contract's observation dict through the same plumbing as the LIBERO adapter (`rsd.envs.sim_common`): frames
rotated 180°, proprio = eef pos + axis-angle + gripper qpos (8). Actions are robosuite's OSC_POSE deltas in the
controller's own units (xyz and axis-angle in [-1, 1], gripper -1 open / +1 close), so demonstrations recorded
here are replayed unchanged. The scripted expert of these tasks is `rsd.envs.robosuite_expert.RobosuiteExpert`;
`rsd generate-demos --env robosuite:Lift` records its successful episodes (`rsd.envs.demos`).

Rendering needs an OpenGL backend without a display: `MUJOCO_GL=egl` (the default set here when the variable is
unset; Mesa's EGL renders on the CPU) or `MUJOCO_GL=osmesa` (Debian: `apt-get install libosmesa6`).

Usage:
    env = make_env("robosuite:Lift", image_size=128)          # rsd.envs.base; or RobosuiteEnv("Lift", image_size=128)
    obs = env.reset(seed=0)
    obs, reward, done, info = env.step(np.zeros(7))          # info["success"]
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    step_outcome,
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

        The global numpy RNG state is restored afterwards, so callers' random streams are not disturbed. robosuite's
        soft reset keeps each gripper's integrated command (`current_action`) from the previous episode, so an
        episode began with the last one's grip and a seed's outcome depended on the episodes before it; it is set
        back to a new gripper's zeros here, so a seed plays the same alone, in a sequence or in any worker.
        """
        for robot in self._env.robots:
            gripper = getattr(robot, "gripper", None)
            if gripper is not None:
                gripper.current_action = np.zeros(gripper.dof)
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
        ended, info = step_outcome(self._steps, self.max_steps, success=bool(self._env._check_success()))
        return self._observation(), float(reward), ended, info

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


def make_robosuite_env(task: str, **kwargs: Any) -> RobosuiteEnv:
    """Registry factory for `robosuite:<task>` (kwargs: cameras, image_size, max_steps, control_freq, robot)."""
    known = {"cameras", "image_size", "max_steps", "control_freq", "robot"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"robosuite:{task}: expected options from {sorted(known)}, got unknown {unknown}.")
    return RobosuiteEnv(task, **kwargs)
