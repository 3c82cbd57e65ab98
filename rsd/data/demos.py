"""Scripted demonstrations written as a LIBERO-layout HDF5 file: the training data of the whole pipeline.

The tabletop expert (`rsd.envs.expert.ScriptedExpert`) runs on seeds `seed .. seed + episodes - 1`; only
successful episodes are kept (the count of failures is reported), so every demonstration solves its task.
`robosuite:<Task>` is handed to the robosuite adapter (`rsd.envs.robosuite.generate_robosuite_demos`, its own
expert), `libero:<suite>` to `rsd.envs.libero_demos.generate_libero_demos` (resumable, parallel); both write the
same layout.

Usage:
    summary = generate_demos("tabletop", episodes=200, out="runs/demo/demos.hdf5", seed=0)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from rsd.data.dataset import Episode
from rsd.data.hdf5 import write_demos
from rsd.envs.expert import ScriptedExpert
from rsd.envs.tabletop import TabletopEnv
from rsd.errors import ConfigError, DataError


class Expert(Protocol):
    """A scripted expert: `reset(seed)` at the start of an episode, then `act(obs)` each step."""

    def reset(self, seed: int | None = None) -> None:
        """Start an episode's script (`seed` reseeds any action noise)."""
        ...

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """The expert's action `[7]` for an observation."""
        ...


def rollout(env: Any, expert: Expert, seed: int, episode_id: int, cameras: Sequence[str]) -> tuple[Episode, bool]:
    """Run one expert episode; return it (frames `[T, H, W, 3]` per camera, proprio `[T, 8]`, actions `[T, 7]`) and its success."""
    obs = env.reset(seed)
    expert.reset(seed)
    frames: list[list[np.ndarray]] = []
    proprio, actions = [], []
    done, info = False, {}
    while not done:
        action = np.asarray(expert.act(obs), dtype=np.float32)
        frames.append(obs["image"] if len(cameras) > 1 else [obs["image"]])
        proprio.append(obs["proprio"])
        actions.append(action)
        obs, _, done, info = env.step(action)
    images = {camera: np.stack([f[i] for f in frames]) for i, camera in enumerate(cameras)}
    return Episode(episode_id, obs["instruction"], np.stack(actions), images, np.stack(proprio)), bool(info["success"])


def record_demos(env: Any, expert: Expert, seeds: Sequence[int], out: str | Path, env_name: str, env_kwargs: dict[str, Any],
                 cameras: Sequence[str], progress: bool = True) -> dict[str, Any]:
    """Run `expert` on every seed, write the successful episodes to `out` (LIBERO layout); return counts and speed.

    `steps` counts every simulated step (failed episodes included); `steps_per_second` is over the whole call.
    """
    started = time.perf_counter()
    kept: list[Episode] = []
    failed = steps = 0
    bar = tqdm(seeds, desc=f"generate-demos {env_name}", unit="episode", disable=not progress)
    for episode_seed in bar:
        episode, success = rollout(env, expert, episode_seed, len(kept), cameras)
        steps += len(episode)
        if success:
            kept.append(episode)
        else:
            failed += 1
        bar.set_postfix(kept=len(kept), failed=failed)
    if not kept:
        raise DataError(f"generate-demos {env_name}: expected at least one successful episode, got {failed} failures out of {len(seeds)}.")
    write_demos(out, kept, env_name=env_name, env_kwargs=env_kwargs)
    seconds = time.perf_counter() - started
    return {"episodes": len(kept), "failed": failed, "steps": steps, "seconds": seconds, "steps_per_second": steps / seconds, "out": str(out)}


def generate_demos(
    env: str,
    episodes: int,
    out: str | Path,
    seed: int = 0,
    image_size: int = 64,
    task_family: str = "any",
    progress: bool = True,
    libero_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the expert for `episodes` seeds and write the successful ones to `out`; return counts and speed (`record_demos`).

    `libero_options` (libero:<suite> only) go to `generate_libero_demos`: tasks, workers, assets, render_size, init.
    """
    if episodes <= 0:
        raise ConfigError(f"generate-demos --episodes: expected an int > 0, got {episodes}.")
    if env.startswith("libero:"):
        from rsd.envs.libero_demos import generate_libero_demos

        return generate_libero_demos(env.partition(":")[2], episodes, out, seed=seed, image_size=image_size, progress=progress,
                                     **(libero_options or {}))
    if env.startswith("robosuite:"):
        from rsd.envs.robosuite import generate_robosuite_demos

        return generate_robosuite_demos(env.partition(":")[2], episodes, out, seed=seed, image_size=image_size, progress=progress)
    if env != "tabletop":
        raise ConfigError(f"generate-demos --env: expected 'tabletop', 'robosuite:<Task>' or 'libero:<suite>', got {env!r}.")
    env_kwargs: dict[str, Any] = {"image_size": image_size, "task_family": task_family}
    world = TabletopEnv(**env_kwargs)
    return record_demos(world, ScriptedExpert(world), range(seed, seed + episodes), out, env, env_kwargs, ("agentview",), progress)
