"""Scripted demonstrations written as a LIBERO-layout HDF5 file: the training data of the whole pipeline.

The environment's scripted expert (`rsd.envs.base.expert_factory`: `ScriptedExpert` for the tabletop world,
`RobosuiteExpert` for robosuite tasks, `LiberoExpert` for LIBERO's) runs on seeds `seed .. seed + episodes - 1`;
only successful episodes are kept (the count of failures is reported), so every demonstration solves its task.
The file layout is `rsd.data.hdf5`'s, whatever the environment. LIBERO episodes take minutes when rendered on a
CPU: `rsd.envs.libero_demos.generate_libero_demos` (what `rsd generate-demos --env libero:...` runs) records them
with the same `rollout`, one shard per episode, resumable and spread over processes.

With a trained `policy`, the episodes are DAgger-style recovery demonstrations: the policy acts for a random
number of steps (1 to `handover`, not recorded), then the expert takes over from the state the policy left and
the episode is recorded from there. The states are the policy's own (a missed grasp, a gripper closed on
nothing, a drift off course) and the labels are the expert's corrections; `aggregate` writes the earlier
demonstrations first, so one file holds DAgger's aggregated dataset. The expert must act from any state: the
tabletop expert re-enters its script at the right phase; takeovers the expert fails are dropped like any failure.
The file records which demo ids each run produced and with which settings (`rsd.data.hdf5.read_provenance`), so
recovery episodes stay identifiable.

Usage:
    summary = generate_demos("tabletop", episodes=200, out="runs/demo/demos.hdf5", seed=0)
    summary = generate_demos("tabletop", episodes=500, out="runs/demo/dagger.hdf5", seed=2000, noise=0.1,
                             policy="runs/demo/policy", handover=40, aggregate="runs/demo/demos.hdf5")
    summary = generate_demos("robosuite:Lift", episodes=50, out="runs/lift/demos.hdf5", image_size=128)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tqdm import tqdm

from rsd.data.dataset import Episode
from rsd.data.hdf5 import count_demos, read_demos, read_env_spec, read_provenance, write_demos
from rsd.envs.base import Env, Expert, expert_factory, make_env
from rsd.errors import ConfigError, DataError

if TYPE_CHECKING:
    from rsd.runtime.policy import MainOnlyPolicy


class Learner(Protocol):
    """A trained policy steering an episode before the expert takes over (e.g. `MainOnlyPolicy`)."""

    def reset(self) -> None:
        """Forget the previous episode's state."""
        ...

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """The next action `[7]` for an observation."""
        ...


def rollout(env: Env, expert: Expert, seed: int, episode_id: int, cameras: Sequence[str], noise: float = 0.0,
            learner: Learner | None = None, handover: int = 0) -> tuple[Episode | None, bool]:
    """Run one expert episode; return it (frames `[T, H, W, 3]` per camera, proprio `[T, 8]`, actions `[T, 7]`, and the
    object state `[T, S]` when the env observes one) and its success.

    With `noise > 0` the episode is DART-style: the env executes the expert's action plus Gaussian noise of std
    `noise` on the xyz dimensions (clipped to [-1, 1]) while the episode records the expert's clean action, so the
    demonstrations visit perturbed states together with the expert's correction from them. With a `learner`, it
    acts for the first `handover` steps, unrecorded, and the expert takes over from there; the episode is None when
    the learner's steps already ended it.
    """
    obs = env.reset(seed)
    if learner is not None:
        learner.reset()
        for _ in range(handover):
            obs, _, done, info = env.step(np.asarray(learner.act(obs), dtype=np.float32))
            if done:
                return None, bool(info["success"])
    return expert_episode(env, expert, obs, seed, episode_id, cameras, noise)


def expert_episode(env: Env, expert: Expert, obs: dict[str, Any], seed: int, episode_id: int, cameras: Sequence[str],
                   noise: float = 0.0) -> tuple[Episode, bool]:
    """The recorded part of `rollout`: the expert (reset for `seed`) acts from observation `obs` of `env` until the
    episode ends; the episode and its success."""
    expert.reset(seed)
    rng = np.random.default_rng([seed, 1])
    frames: list[list[np.ndarray]] = []
    proprio, actions, objects = [], [], []
    done, info = False, {}
    while not done:
        action = np.asarray(expert.act(obs), dtype=np.float32)
        frames.append(obs["image"] if len(cameras) > 1 else [obs["image"]])
        proprio.append(obs["proprio"])
        if "object" in obs:
            objects.append(obs["object"])
        actions.append(action)
        executed = action.copy()
        if noise > 0:
            executed[:3] = np.clip(executed[:3] + rng.normal(0.0, noise, size=3), -1.0, 1.0)
        obs, _, done, info = env.step(executed)
    images = {camera: np.stack([f[i] for f in frames]) for i, camera in enumerate(cameras)}
    object_state = np.stack(objects).astype(np.float32) if objects else None
    return Episode(episode_id, obs["instruction"], np.stack(actions), images, np.stack(proprio), object_state), bool(info["success"])


def recovery_rollouts(worlds: Sequence[Env], experts: Sequence[Expert], learners: Sequence[Any], seeds: Sequence[int],
                      leads: Sequence[int], cameras: Sequence[str], noise: float = 0.0) -> Iterator[tuple[int, Episode | None, bool]]:
    """`rollout` with a learner for every seed, `len(worlds)` episodes side by side (`rsd.envs.evaluate.side_by_side`):
    the learners (replicas on one engine) act in one batch for the first `leads[i]` steps of seed i, then that slot's
    expert records the rest and the slot takes the next seed. Yields `(seed, episode or None, success)` as episodes
    end (episode ids 0: the caller numbers them); every seed's episode is the one `rollout` records alone."""
    from rsd.envs.evaluate import side_by_side

    if len(experts) != len(worlds):
        raise ConfigError(f"recovery_rollouts: expected one expert per env, got {len(experts)} experts for {len(worlds)} envs.")
    for index, slot, obs, _, done, info in side_by_side(learners, worlds, seeds, leads):
        seed = int(seeds[index])
        yield seed, *((None, bool(info["success"])) if done else expert_episode(worlds[slot], experts[slot], obs, seed, 0, cameras, noise))


def record_demos(env: Env | Sequence[Env], expert: Expert | Sequence[Expert], seeds: Sequence[int], out: str | Path, env_name: str,
                 env_kwargs: dict[str, Any], cameras: Sequence[str], progress: bool = True, noise: float = 0.0,
                 learner: Learner | Sequence[Any] | None = None, handover: int = 0, earlier: Sequence[Episode] = (),
                 provenance: Sequence[dict[str, Any]] = (), learner_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run `expert` on every seed (with DART execution `noise`; after up to `handover` steps of `learner`, drawn per
    seed; see `rollout`), write `earlier` and then the successful episodes to `out` (LIBERO layout); return counts
    and speed.

    Lists of envs, experts and learners (replicas on one engine) play that many recovery episodes side by side
    (`recovery_rollouts`); the file is the same, episodes in seed order.

    The file's provenance is `provenance` (the records of `earlier`) followed by this run's record: its demo ids,
    seeds, noise and, for recovery episodes, `learner_info` (what the learner is, e.g. its folder) and `handover`.

    `steps` counts every recorded step (failed episodes included); `learner_done` counts the episodes the learner
    ended before its handover (nothing to record); `steps_per_second` is over the whole call.
    """
    started = time.perf_counter()
    leads = [int(np.random.default_rng([seed, 2]).integers(1, handover + 1)) if learner is not None else 0 for seed in seeds]
    if isinstance(env, Sequence):
        if learner is None:
            raise ConfigError("record_demos: several envs play recovery episodes side by side; expected learners too, got none.")
        outcomes = recovery_rollouts(env, expert, learner, seeds, leads, cameras, noise)
    elif isinstance(learner, Sequence) or isinstance(expert, Sequence):
        raise ConfigError("record_demos: lists of learners or experts play side by side in a list of envs; expected one of each with one env.")
    else:
        outcomes = ((seed, *rollout(env, expert, seed, 0, cameras, noise, learner, lead)) for seed, lead in zip(seeds, leads, strict=True))
    ended: dict[int, tuple[Episode | None, bool]] = {}
    succeeded = failed = steps = learner_done = 0
    bar = tqdm(total=len(seeds), desc=f"generate-demos {env_name}", unit="episode", disable=not progress)
    for seed, episode, success in outcomes:
        ended[seed] = episode, success
        learner_done += episode is None
        succeeded += episode is not None and success
        failed += episode is not None and not success
        steps += 0 if episode is None else len(episode)
        bar.update()
        bar.set_postfix(kept=succeeded, failed=failed)
    bar.close()
    kept: list[Episode] = list(earlier)
    for seed in seeds:
        episode, success = ended[int(seed)]
        if episode is not None and success:
            episode.episode_id = len(kept)
            kept.append(episode)
    if len(kept) == len(earlier):
        raise DataError(f"generate-demos {env_name}: expected at least one successful episode, got {failed} failures "
                        f"(and {learner_done} episodes the policy ended) out of {len(seeds)}.")
    record = {"first_demo": len(earlier), "end_demo": len(kept), "seeds": [int(seeds[0]), int(seeds[-1])], "noise": noise,
              "learner": learner_info if learner is not None else None, "handover": handover if learner is not None else None}
    write_demos(out, kept, env_name=env_name, env_kwargs=env_kwargs, provenance=[*provenance, record])
    seconds = time.perf_counter() - started
    return {"episodes": len(kept) - len(earlier), "failed": failed, "steps": steps, "seconds": seconds, "steps_per_second": steps / seconds,
            "noise": noise, "handover": handover if learner is not None else None, "learner_done": learner_done,
            "aggregated": len(earlier), "out": str(out)}


def generate_demos(
    env: str,
    episodes: int,
    out: str | Path,
    seed: int = 0,
    image_size: int = 64,
    progress: bool = True,
    noise: float = 0.0,
    policy: str | Path | None = None,
    handover: int = 40,
    aggregate: str | Path | None = None,
    replan_every: int | None = None,
    aggregate_episodes: int | None = None,
    batch: int = 1,
    **options: Any,
) -> dict[str, Any]:
    """Run the expert of `env` for `episodes` seeds and write the successful ones to `out`; return counts and speed.

    `options` are the environment's own (e.g. `task_family` for the tabletop world, `cameras` for robosuite); they
    are recorded in the file with `image_size`. With `policy` (a trained policy folder) the expert takes over
    after up to `handover` of its steps (DAgger-style, see the module docstring), executing `replan_every` steps of
    each chunk as deployed (None: whole chunks); `aggregate` is a demonstration file of the same environment whose
    episodes are written first (only its first `aggregate_episodes` with that set). See `record_demos` for the
    returned figures.
    """
    if episodes <= 0:
        raise ConfigError(f"generate-demos --episodes: expected an int > 0, got {episodes}.")
    if not 0.0 <= noise <= 1.0:
        raise ConfigError(f"generate-demos --noise: expected a float in [0, 1], got {noise}.")
    if policy is not None and handover <= 0:
        raise ConfigError(f"generate-demos --handover: expected an int > 0 (the policy's steps before the expert takes over), got {handover}.")
    if replan_every is not None and policy is None:
        raise ConfigError("generate-demos --replan-every: it is how --policy executes its chunks; pass --policy too.")
    if aggregate_episodes is not None and (aggregate is None or aggregate_episodes <= 0):
        raise ConfigError(f"generate-demos --aggregate-episodes: expected an int > 0 with --aggregate, got {aggregate_episodes} "
                          f"with --aggregate {aggregate}.")
    if not isinstance(batch, int) or batch < 1 or (batch > 1 and policy is None):
        raise ConfigError(f"generate-demos --batch: expected an int >= 1 (above 1 only with --policy: the policy's episodes play side by side), "
                          f"got {batch!r} with --policy {policy}.")
    make_expert = expert_factory(env)
    env_kwargs: dict[str, Any] = {"image_size": image_size, **options}
    earlier, provenance = _aggregated(aggregate, env, env_kwargs, aggregate_episodes) if aggregate is not None else ([], [])
    learner = _learner(policy, replan_every) if policy is not None else None
    worlds = [make_env(env, **env_kwargs) for _ in range(min(batch, episodes))]
    try:
        if not worlds[0].cameras:
            raise ConfigError(f"generate-demos {env}: expected at least one camera (demonstrations store frames), got none.")
        experts = [make_expert(world) for world in worlds]
        info = None if policy is None else {"policy": str(policy), "replan_every": replan_every}
        if learner is not None and len(worlds) > 1:
            learners = [learner] + [learner.replica() for _ in worlds[1:]]
            return record_demos(worlds, experts, range(seed, seed + episodes), out, env, env_kwargs, worlds[0].cameras, progress, noise,
                                learners, handover, earlier, provenance, info)
        return record_demos(worlds[0], experts[0], range(seed, seed + episodes), out, env, env_kwargs, worlds[0].cameras, progress, noise,
                            learner, handover, earlier, provenance, info)
    finally:
        for world in worlds:
            world.close()


def _learner(policy: str | Path, replan_every: int | None = None) -> MainOnlyPolicy:
    """The main-only policy of a trained policy folder, on the CPU (it only steers the episodes' first steps)."""
    from rsd.runtime.policy import MainOnlyPolicy, load_main

    return MainOnlyPolicy(load_main(policy, "cpu", None), replan_every)


def _aggregated(path: str | Path, env: str, env_kwargs: dict[str, Any], limit: int | None = None) -> tuple[list[Episode], list[dict[str, Any]]]:
    """The episodes (the first `limit` of them with that set) and provenance records of demonstration file `path`,
    which must have been recorded in `env` with `env_kwargs`."""
    recorded = read_env_spec(path)
    if recorded != (env, json.loads(json.dumps(env_kwargs))):  # as the file stores them: a tuple of cameras reads back as a list
        raise ConfigError(f"generate-demos --aggregate {path}: expected demonstrations recorded in {env} with {env_kwargs}, got {recorded}.")
    total, provenance = count_demos(path), read_provenance(path)
    episodes = read_demos(path, first=limit)  # only the episodes kept are read
    if limit is None or limit >= total:
        return episodes, provenance
    return episodes, [*provenance, {"kept_first": limit, "of": total, "from": str(path)}]
