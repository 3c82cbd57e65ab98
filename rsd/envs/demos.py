"""Scripted demonstrations written as a LIBERO-layout HDF5 file: the training data of the whole pipeline.

The environment's scripted expert (`rsd.envs.base.expert_factory`: `ScriptedExpert` for the tabletop world,
`RobosuiteExpert` for robosuite tasks, `LiberoExpert` for LIBERO's) runs on seeds `seed .. seed + episodes - 1`;
only successful episodes are kept (the count of failures is reported), so every demonstration solves its task.
The file layout is `rsd.data.hdf5`'s, whatever the environment. LIBERO episodes take minutes when rendered on a
CPU: `rsd.envs.libero_demos.generate_libero_demos` (what `rsd generate-demos --env libero:...` runs) records them
with the same `rollout`, one shard per episode, resumable and spread over processes.

Usage:
    summary = generate_demos("tabletop", episodes=200, out="runs/demo/demos.hdf5", seed=0)
    summary = generate_demos("robosuite:Lift", episodes=50, out="runs/lift/demos.hdf5", image_size=128)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rsd.data.dataset import Episode
from rsd.data.hdf5 import write_demos
from rsd.envs.base import Env, Expert, expert_factory, make_env
from rsd.errors import ConfigError, DataError


def rollout(env: Env, expert: Expert, seed: int, episode_id: int, cameras: Sequence[str], noise: float = 0.0) -> tuple[Episode, bool]:
    """Run one expert episode; return it (frames `[T, H, W, 3]` per camera, proprio `[T, 8]`, actions `[T, 7]`) and its success.

    With `noise > 0` the episode is DART-style: the env executes the expert's action plus Gaussian noise of std
    `noise` on the xyz dimensions (clipped to [-1, 1]) while the episode records the expert's clean action, so the
    demonstrations visit perturbed states together with the expert's correction from them.
    """
    obs = env.reset(seed)
    expert.reset(seed)
    rng = np.random.default_rng([seed, 1])
    frames: list[list[np.ndarray]] = []
    proprio, actions = [], []
    done, info = False, {}
    while not done:
        action = np.asarray(expert.act(obs), dtype=np.float32)
        frames.append(obs["image"] if len(cameras) > 1 else [obs["image"]])
        proprio.append(obs["proprio"])
        actions.append(action)
        executed = action.copy()
        if noise > 0:
            executed[:3] = np.clip(executed[:3] + rng.normal(0.0, noise, size=3), -1.0, 1.0)
        obs, _, done, info = env.step(executed)
    images = {camera: np.stack([f[i] for f in frames]) for i, camera in enumerate(cameras)}
    return Episode(episode_id, obs["instruction"], np.stack(actions), images, np.stack(proprio)), bool(info["success"])


def record_demos(env: Env, expert: Expert, seeds: Sequence[int], out: str | Path, env_name: str, env_kwargs: dict[str, Any],
                 cameras: Sequence[str], progress: bool = True, noise: float = 0.0) -> dict[str, Any]:
    """Run `expert` on every seed (with DART execution `noise`, see `rollout`), write the successful episodes to `out`
    (LIBERO layout); return counts and speed.

    `steps` counts every simulated step (failed episodes included); `steps_per_second` is over the whole call.
    """
    started = time.perf_counter()
    kept: list[Episode] = []
    failed = steps = 0
    bar = tqdm(seeds, desc=f"generate-demos {env_name}", unit="episode", disable=not progress)
    for episode_seed in bar:
        episode, success = rollout(env, expert, episode_seed, len(kept), cameras, noise)
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
    return {"episodes": len(kept), "failed": failed, "steps": steps, "seconds": seconds, "steps_per_second": steps / seconds,
            "noise": noise, "out": str(out)}


def generate_demos(
    env: str,
    episodes: int,
    out: str | Path,
    seed: int = 0,
    image_size: int = 64,
    progress: bool = True,
    noise: float = 0.0,
    **options: Any,
) -> dict[str, Any]:
    """Run the expert of `env` for `episodes` seeds and write the successful ones to `out`; return counts and speed.

    `options` are the environment's own (e.g. `task_family` for the tabletop world, `cameras` for robosuite); they
    are recorded in the file with `image_size`. See `record_demos` for the returned figures.
    """
    if episodes <= 0:
        raise ConfigError(f"generate-demos --episodes: expected an int > 0, got {episodes}.")
    if not 0.0 <= noise <= 1.0:
        raise ConfigError(f"generate-demos --noise: expected a float in [0, 1], got {noise}.")
    make_expert = expert_factory(env)
    env_kwargs: dict[str, Any] = {"image_size": image_size, **options}
    world = make_env(env, **env_kwargs)
    try:
        if not world.cameras:
            raise ConfigError(f"generate-demos {env}: expected at least one camera (demonstrations store frames), got none.")
        return record_demos(world, make_expert(world), range(seed, seed + episodes), out, env, env_kwargs, world.cameras, progress, noise)
    finally:
        world.close()
