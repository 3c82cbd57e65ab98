"""Scripted LIBERO demonstrations, resumable and spread over processes, merged into one LIBERO-layout HDF5 file.

Rendering costs a LIBERO episode tens of seconds on a CPU, so generation is built to be interrupted: every episode
(task t, seed s) is written as its own shard `<out>.shards/task<t>_seed<s>.hdf5` (or a `.failed.json` marker when
the expert failed), each by an atomic rename, and a re-run skips every episode that has a shard or a marker. The
episodes run in `workers` spawned processes (one torch thread each; run the command under `nice` on a shared
machine). When all are done the successful shards are merged, in (task, seed) order, into `out`
(`rsd.data.hdf5` layout, `data/demo_<i>`), which `rsd train-policy --data` reads.

Placements: `init="sampled"` (the default) draws each episode's object placement from the task's BDDL regions
with numpy seeded by the seed, so the suite's 50 fixed init states (the evaluation protocol's) stay unseen;
`init="suite"` replays init state `seed` instead (then seeds must be 0..49). Actions are stored as the env took
them: OpenVLA's LIBERO units (xyz and axis-angle deltas in [-1, 1], gripper 1 = open, 0 = closed), frames upright.

Usage:
    summary = generate_libero_demos("libero_spatial", tasks=[0, 1], episodes=30, out="runs/libero/demos.hdf5", workers=2)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
from tqdm import tqdm

from rsd.errors import ConfigError, DataError


@dataclass(frozen=True)
class LiberoDemoConfig:
    """What a generation run records; a resumed run must match the shards' config exactly."""

    suite: str  # LIBERO suite, e.g. libero_spatial
    tasks: tuple[int, ...]  # task ids of the suite
    image_size: int = 128  # side of the stored frames (the policy's input)
    render_size: int = 256  # side the simulator renders at (OpenVLA-OFT's protocol: 256)
    cameras: tuple[str, ...] = ("agentview",)  # cameras recorded per step
    init: str = "sampled"  # "sampled" placements or the suite's fixed "suite" init states
    assets: str | None = field(default=None, compare=False)  # scene-asset folder (None: found automatically)

    def __post_init__(self) -> None:
        from rsd.envs.sim_common import check_suite

        check_suite(self.suite)
        if not self.tasks or any(t < 0 for t in self.tasks) or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"LiberoDemoConfig.tasks: expected distinct task ids >= 0, got {list(self.tasks)}.")
        if self.image_size <= 0 or self.render_size <= 0:
            raise ConfigError(f"LiberoDemoConfig.image_size/render_size: expected ints > 0, got {self.image_size}, {self.render_size}.")
        if not self.cameras:
            raise ConfigError("LiberoDemoConfig.cameras: expected at least one camera (demos store frames), got none.")
        if self.init not in ("sampled", "suite"):
            raise ConfigError(f"LiberoDemoConfig.init: expected 'sampled' or 'suite', got {self.init!r}.")

    def env_kwargs(self) -> dict[str, Any]:
        """The `LiberoEnv` options that reproduce the recorded observations (written into the demo file)."""
        return {"cameras": list(self.cameras), "image_size": self.image_size, "render_size": self.render_size, "init": self.init}

    def to_json(self) -> dict[str, Any]:
        """The fields that must agree between runs on the same shard folder."""
        data = asdict(self)
        data.pop("assets")
        data["tasks"], data["cameras"] = list(self.tasks), list(self.cameras)
        return data


def shard_dir(out: str | Path) -> Path:
    """The folder holding the per-episode shards of `out`."""
    out = Path(out)
    return out.with_name(out.name + ".shards")


def _shard(folder: Path, task: int, seed: int) -> Path:
    return folder / f"task{task:03d}_seed{seed:06d}.hdf5"


def _failed(folder: Path, task: int, seed: int) -> Path:
    return folder / f"task{task:03d}_seed{seed:06d}.failed.json"


# --- worker processes ---------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker() -> None:
    """One torch thread per worker process (the episodes run side by side)."""
    import torch

    torch.set_num_threads(1)


def _run_episode(job: tuple[dict[str, Any], str, int, int]) -> tuple[int, int, bool, int, float]:
    """Run one expert episode in this worker and write its shard; `(task, seed, success, steps, seconds)`."""
    from rsd.data.demos import rollout
    from rsd.data.hdf5 import write_demos
    from rsd.envs.libero import LiberoEnv
    from rsd.envs.libero_expert import LiberoExpert

    config_json, folder_text, task, seed = job
    config = LiberoDemoConfig(**{**config_json, "tasks": tuple(config_json["tasks"]), "cameras": tuple(config_json["cameras"])})
    folder = Path(folder_text)
    started = time.perf_counter()
    if _WORKER.get("task") != task:
        if "env" in _WORKER:
            _WORKER["env"].close()
        env = LiberoEnv(config.suite, task, cameras=config.cameras, image_size=config.image_size, render_size=config.render_size,
                        assets=_WORKER.get("assets"), init=config.init)
        _WORKER.update(env=env, expert=LiberoExpert(env), task=task)
    env, expert = _WORKER["env"], _WORKER["expert"]
    episode, success = rollout(env, expert, seed, 0, config.cameras)
    if success:
        temporary = folder / f".tmp-{os.getpid()}-{_shard(folder, task, seed).name}"
        write_demos(temporary, [episode], env_name=f"libero:{config.suite}/{task}", env_kwargs=config.env_kwargs())
        os.replace(temporary, _shard(folder, task, seed))
    else:
        temporary = folder / f".tmp-{os.getpid()}-{_failed(folder, task, seed).name}"
        temporary.write_text(json.dumps({"task": task, "seed": seed, "steps": len(episode)}) + "\n")
        os.replace(temporary, _failed(folder, task, seed))
    return task, seed, success, len(episode), time.perf_counter() - started


def _set_assets(assets: str | None) -> None:
    _WORKER["assets"] = assets


def _init_with_assets(assets: str | None) -> None:
    _init_worker()
    _set_assets(assets)


def _jobs(config: LiberoDemoConfig, folder: Path, seeds: Sequence[int]) -> tuple[list[tuple[dict[str, Any], str, int, int]], int]:
    """The (task, seed) episodes that have neither a shard nor a failure marker yet, and how many were skipped."""
    todo, done = [], 0
    for task in config.tasks:
        for seed in seeds:
            if _shard(folder, task, seed).is_file() or _failed(folder, task, seed).is_file():
                done += 1
            else:
                todo.append((config.to_json(), str(folder), task, seed))
    return todo, done


def _results(jobs: list[tuple[dict[str, Any], str, int, int]], workers: int, assets: str | None) -> Iterator[tuple[int, int, bool, int, float]]:
    """Run `jobs` in this process (workers=1) or in a pool of spawned processes; yield results as they finish."""
    if workers == 1:
        _set_assets(assets)
        for job in jobs:
            yield _run_episode(job)
        return
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked GL or torch state
    with context.Pool(workers, initializer=_init_with_assets, initargs=(assets,)) as pool:
        yield from pool.imap(_run_episode, jobs, chunksize=1)


def merge_shards(shards: Sequence[Path], out: str | Path, env_name: str, env_kwargs: dict[str, Any]) -> int:
    """Copy the one-episode shards into one LIBERO-layout file `out` as `demo_0 .. demo_{n-1}`; total steps."""
    from rsd.data.hdf5 import read_demos, write_demos

    if not shards:
        raise DataError(f"{out}: expected at least one successful episode shard to merge, got none.")
    out = Path(out)
    temporary = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    first = read_demos(shards[0])[0]
    first.episode_id = 0
    write_demos(temporary, [first], env_name=env_name, env_kwargs=env_kwargs)
    total = len(first)
    instructions = {first.instruction}
    with h5py.File(temporary, "a") as file:
        data = file["data"]
        for index, shard in enumerate(shards[1:], start=1):
            with h5py.File(shard, "r") as source:
                demo = source["data/demo_0"]
                source.copy(demo, data, name=f"demo_{index}")
                total += int(demo.attrs["num_samples"])
                instructions.add(str(demo.attrs["language_instruction"]))
        data.attrs["num_demos"] = len(shards)
        data.attrs["total"] = total
        if len(instructions) > 1:  # several tasks: each demo group carries its own instruction
            info = json.loads(data.attrs["problem_info"])
            info["language_instruction"] = ""
            data.attrs["problem_info"] = json.dumps(info)
    os.replace(temporary, out)
    return total


def generate_libero_demos(
    suite: str,
    episodes: int,
    out: str | Path,
    tasks: Sequence[int] | None = None,
    seed: int = 0,
    image_size: int = 128,
    render_size: int = 256,
    cameras: Sequence[str] = ("agentview",),
    init: str = "sampled",
    workers: int = 1,
    assets: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the scripted expert on seeds `seed .. seed + episodes - 1` of every task; merge the successes into `out`.

    `suite` may carry the task ("libero_spatial/3"); else `tasks` (default: all of the suite). Finished episodes
    (shards or failure markers under `<out>.shards/`) are skipped, so an interrupted run resumes where it stopped.
    Returns counts and speed: `episodes` kept, `failed`, `skipped` (done by an earlier run), `steps` and `seconds`
    of this run's episodes, and `per_task` `{task: [kept, failed]}` over all shards.
    """
    from rsd.envs.libero import get_suite

    name, _, tail = suite.partition("/")
    if tail:
        if not tail.isdigit() or (tasks is not None and list(tasks) != [int(tail)]):
            raise ConfigError(f"generate-demos libero:{suite}: expected an integer task id in the name or --tasks, not both; got {tail!r} and {tasks}.")
        tasks = [int(tail)]
    if episodes <= 0:
        raise ConfigError(f"generate-demos --episodes: expected an int > 0, got {episodes}.")
    if workers <= 0:
        raise ConfigError(f"generate-demos --workers: expected an int > 0, got {workers}.")
    count = len(get_suite(name).tasks)
    tasks = list(range(count)) if tasks is None else list(tasks)
    if any(not 0 <= t < count for t in tasks):
        raise ConfigError(f"generate-demos --tasks: expected task ids in 0..{count - 1} for {name}, got {tasks}.")
    config = LiberoDemoConfig(name, tuple(tasks), image_size, render_size, tuple(cameras), init, None if assets is None else str(assets))
    if init == "suite" and not (0 <= seed and seed + episodes <= 50):
        raise ConfigError(f"generate-demos: init='suite' replays the suite's 50 init states; expected seeds within 0..49, got {seed}..{seed + episodes - 1}.")
    folder = shard_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    recorded = folder / "config.json"
    if recorded.is_file():
        previous = json.loads(recorded.read_text())
        if previous != {**config.to_json(), "tasks": previous["tasks"]}:
            raise ConfigError(f"generate-demos: {folder} holds shards made with {previous}, not {config.to_json()}; use another --out.")
    recorded.write_text(json.dumps(config.to_json(), indent=2) + "\n")
    seeds = list(range(seed, seed + episodes))
    jobs, skipped = _jobs(config, folder, seeds)
    started = time.perf_counter()
    kept = failed = steps = 0
    bar = tqdm(total=len(jobs), desc=f"generate-demos libero:{name}", unit="episode", disable=not progress)
    for _, _, success, length, _ in _results(jobs, min(workers, max(len(jobs), 1)), config.assets):
        kept += success
        failed += not success
        steps += length
        bar.update(1)
        bar.set_postfix(kept=kept, failed=failed, skipped=skipped)
    bar.close()
    seconds = time.perf_counter() - started
    shards = [_shard(folder, t, s) for t in tasks for s in seeds if _shard(folder, t, s).is_file()]
    per_task = {t: [sum(_shard(folder, t, s).is_file() for s in seeds), sum(_failed(folder, t, s).is_file() for s in seeds)] for t in tasks}
    total = merge_shards(shards, out, f"libero:{name}", {**config.env_kwargs(), "tasks": tasks})
    return {"episodes": len(shards), "failed": sum(f for _, f in per_task.values()), "skipped": skipped, "steps": steps,
            "seconds": seconds, "steps_per_second": steps / seconds if seconds > 0 else 0.0, "total_steps": total,
            "per_task": per_task, "out": str(out), "run_kept": kept, "run_failed": failed}
