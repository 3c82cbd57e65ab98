"""Scripted demonstrations written as a LIBERO-layout HDF5 file: the training data of the whole pipeline.

The tabletop expert (`rsd.envs.expert.ScriptedExpert`) runs on seeds `seed .. seed + episodes - 1`; only
successful episodes are kept (the count of failures is reported), so every demonstration solves its task.
`robosuite:<Task>` is handed to the robosuite adapter (`rsd.envs.robosuite.generate_robosuite_demos`, its own
expert), which writes the same layout.

Usage:
    summary = generate_demos("tabletop", episodes=200, out="runs/demo/demos.hdf5", seed=0)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rsd.data.dataset import Episode
from rsd.data.hdf5 import write_demos
from rsd.envs.expert import ScriptedExpert
from rsd.envs.tabletop import TabletopEnv
from rsd.errors import ConfigError, DataError


def _rollout(env: TabletopEnv, expert: ScriptedExpert, seed: int, episode_id: int) -> tuple[Episode, bool]:
    """Run one expert episode; return it (frames `[T, H, W, 3]`, proprio `[T, 8]`, actions `[T, 7]`) and its success."""
    obs = env.reset(seed)
    frames, proprio, actions = [], [], []
    done, info = False, {}
    while not done:
        action = np.asarray(expert.act(obs), dtype=np.float32)
        frames.append(obs["image"])
        proprio.append(obs["proprio"])
        actions.append(action)
        obs, _, done, info = env.step(action)
    episode = Episode(episode_id, obs["instruction"], np.stack(actions), {"agentview": np.stack(frames)}, np.stack(proprio).astype(np.float32))
    return episode, bool(info["success"])


def generate_demos(
    env: str,
    episodes: int,
    out: str | Path,
    seed: int = 0,
    image_size: int = 64,
    task_family: str = "any",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the expert for `episodes` seeds and write the successful ones to `out`; return counts and speed.

    `steps` counts every simulated step (failed episodes included); `steps_per_second` is over the whole call.
    """
    if episodes <= 0:
        raise ConfigError(f"generate-demos --episodes: expected an int > 0, got {episodes}.")
    if env.startswith("robosuite:"):
        from rsd.envs.robosuite import generate_robosuite_demos

        return generate_robosuite_demos(env.partition(":")[2], episodes, out, seed=seed, image_size=image_size, progress=progress)
    if env != "tabletop":
        raise ConfigError(f"generate-demos --env: expected 'tabletop' or 'robosuite:<Task>', got {env!r}.")
    env_kwargs: dict[str, Any] = {"image_size": image_size, "task_family": task_family}
    world = TabletopEnv(**env_kwargs)
    started = time.perf_counter()
    kept: list[Episode] = []
    failed = steps = 0
    bar = tqdm(range(seed, seed + episodes), desc=f"generate-demos {env}", unit="episode", disable=not progress)
    for episode_seed in bar:
        episode, success = _rollout(world, ScriptedExpert(world, seed=episode_seed), episode_seed, len(kept))
        steps += len(episode)
        if success:
            kept.append(episode)
        else:
            failed += 1
        bar.set_postfix(kept=len(kept), failed=failed)
    if not kept:
        raise DataError(f"generate-demos: expected at least one successful episode, got {failed} failures out of {episodes}.")
    write_demos(out, kept, env_name=env, env_kwargs=env_kwargs)
    seconds = time.perf_counter() - started
    return {"episodes": len(kept), "failed": failed, "steps": steps, "seconds": seconds, "steps_per_second": steps / seconds, "out": str(out)}
