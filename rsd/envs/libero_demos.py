"""Scripted LIBERO demonstrations, resumable and spread over processes, merged into one LIBERO-layout HDF5 file; the expert's check.

Rendering costs a LIBERO episode tens of seconds on a CPU, so generation is built to be interrupted: every episode
(task t, seed s) is written as its own shard `<out>.shards/task<t>_seed<s>.hdf5` (or a `.failed.json` marker when
the expert failed), each by an atomic rename, and a re-run skips every episode that has a shard or a marker. The
episodes run in `workers` spawned processes (one torch thread each; run the command under `nice` on a shared
machine). When all are done the successful shards are merged, in (task, seed) order, into `out`
(`rsd.data.hdf5` layout, `data/demo_<i>`), which `rsd train-policy --data` reads.

Placements: `init="sampled"` (the default) draws each episode's object placement from the task's BDDL regions
with numpy seeded by the seed, so the suite's 50 fixed init states (the evaluation protocol's) stay unseen;
`init="suite"` replays init state `seed` instead (then seeds must be 0..49). Each episode is
`rsd.envs.demos.rollout` of the registry's env and expert (`make_env("libero:<suite>/<task>")`, `LiberoExpert`),
with DART `noise` as there. Actions are stored as the env took them: OpenVLA's LIBERO units (xyz and axis-angle
deltas in [-1, 1], gripper 1 = open, 0 = closed), frames upright.

The same module checks the expert on its own: `check_expert` plays it physics only (no renderer) on the suite's
init states with `rsd.envs.evaluate.play_episode`, spread over processes, and reports success per task.

Usage:
    summary = generate_libero_demos("libero_spatial", tasks=[0, 1], episodes=30, out="runs/libero/demos.hdf5", workers=2)
    results = check_expert("libero_spatial", tasks=None, trials=range(50), workers=2)   # {task: [(trial, success, steps)]}
    print(format_expert_table("libero_spatial", "suite", results))
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
from tqdm import tqdm

from rsd.data.hdf5 import read_demos, write_demos
from rsd.envs.base import expert_factory, make_env
from rsd.envs.demos import rollout
from rsd.envs.evaluate import play_episode
from rsd.envs.libero import TRIALS_PER_TASK, get_suite
from rsd.envs.sim_common import check_suite
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
    noise: float = 0.0  # DART execution noise on xyz (`rsd.envs.demos.rollout`)
    assets: str | None = field(default=None, compare=False)  # scene-asset folder (None: found automatically)

    def __post_init__(self) -> None:
        check_suite(self.suite)
        if not self.tasks or any(t < 0 for t in self.tasks) or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"LiberoDemoConfig.tasks: expected distinct task ids >= 0, got {list(self.tasks)}.")
        if self.image_size <= 0 or self.render_size <= 0:
            raise ConfigError(f"LiberoDemoConfig.image_size/render_size: expected ints > 0, got {self.image_size}, {self.render_size}.")
        if not self.cameras:
            raise ConfigError("LiberoDemoConfig.cameras: expected at least one camera (demos store frames), got none.")
        if self.init not in ("sampled", "suite"):
            raise ConfigError(f"LiberoDemoConfig.init: expected 'sampled' or 'suite', got {self.init!r}.")
        if not 0.0 <= self.noise <= 1.0:
            raise ConfigError(f"LiberoDemoConfig.noise: expected a float in [0, 1], got {self.noise}.")

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


def _init_worker(assets: str | None) -> None:
    """A spawned worker: one torch thread (the episodes run side by side) and the scene-asset folder."""
    import torch

    torch.set_num_threads(1)
    _WORKER["assets"] = assets


def _run_episode(job: tuple[dict[str, Any], str, int, int]) -> tuple[int, int, bool, int, float]:
    """Run one expert episode in this worker and write its shard; `(task, seed, success, steps, seconds)`."""
    config_json, folder_text, task, seed = job
    config = LiberoDemoConfig(**{**config_json, "tasks": tuple(config_json["tasks"]), "cameras": tuple(config_json["cameras"])})
    folder = Path(folder_text)
    started = time.perf_counter()
    if _WORKER.get("task") != task:
        if "env" in _WORKER:
            _WORKER["env"].close()
        name = f"libero:{config.suite}/{task}"
        env = make_env(name, cameras=config.cameras, image_size=config.image_size, render_size=config.render_size,
                       assets=_WORKER.get("assets"), init=config.init)
        _WORKER.update(env=env, expert=expert_factory(name)(env), task=task)
    env, expert = _WORKER["env"], _WORKER["expert"]
    episode, success = rollout(env, expert, seed, 0, config.cameras, config.noise)
    if success:
        temporary = folder / f".tmp-{os.getpid()}-{_shard(folder, task, seed).name}"
        write_demos(temporary, [episode], env_name=f"libero:{config.suite}/{task}", env_kwargs=config.env_kwargs())
        os.replace(temporary, _shard(folder, task, seed))
    else:
        temporary = folder / f".tmp-{os.getpid()}-{_failed(folder, task, seed).name}"
        temporary.write_text(json.dumps({"task": task, "seed": seed, "steps": len(episode)}) + "\n")
        os.replace(temporary, _failed(folder, task, seed))
    return task, seed, success, len(episode), time.perf_counter() - started


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
        _WORKER["assets"] = assets
        try:
            for job in jobs:
                yield _run_episode(job)
        finally:  # this process goes on: free its simulator and forget the cached task
            if "env" in _WORKER:
                _WORKER.pop("env").close()
            _WORKER.clear()
        return
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked GL or torch state
    with context.Pool(workers, initializer=_init_worker, initargs=(assets,)) as pool:
        yield from pool.imap(_run_episode, jobs, chunksize=1)


def merge_shards(shards: Sequence[Path], out: str | Path, env_name: str, env_kwargs: dict[str, Any]) -> int:
    """Copy the one-episode shards into one LIBERO-layout file `out` as `demo_0 .. demo_{n-1}`; total steps."""
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
    noise: float = 0.0,
) -> dict[str, Any]:
    """Run the scripted expert on seeds `seed .. seed + episodes - 1` of every task; merge the successes into `out`.

    `suite` may carry the task ("libero_spatial/3"); else `tasks` (default: all of the suite). Finished episodes
    (shards or failure markers under `<out>.shards/`) are skipped, so an interrupted run resumes where it stopped.
    Returns counts and speed: `episodes` kept, `failed`, `skipped` (done by an earlier run), `steps` and `seconds`
    of this run's episodes, and `per_task` `{task: [kept, failed]}` over all shards.
    """
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
    config = LiberoDemoConfig(name, tuple(tasks), image_size, render_size, tuple(cameras), init, noise, None if assets is None else str(assets))
    if init == "suite" and not (0 <= seed and seed + episodes <= TRIALS_PER_TASK):
        raise ConfigError(f"generate-demos: init='suite' replays the suite's {TRIALS_PER_TASK} init states; "
                          f"expected seeds within 0..{TRIALS_PER_TASK - 1}, got {seed}..{seed + episodes - 1}.")
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
    env_name = f"libero:{name}/{tasks[0]}" if len(tasks) == 1 else f"libero:{name}"  # the tasks: shards' config.json
    total = merge_shards(shards, out, env_name, config.env_kwargs())
    return {"episodes": len(shards), "failed": sum(f for _, f in per_task.values()), "skipped": skipped, "steps": steps,
            "seconds": seconds, "steps_per_second": steps / seconds if seconds > 0 else 0.0, "total_steps": total,
            "per_task": per_task, "out": str(out), "run_kept": kept, "run_failed": failed}


def _check_task(job: tuple[str, int, list[int], str, str | None]) -> tuple[int, list[tuple[int, bool, int]]]:
    """Play the expert state-only on `trials` of one task in this process; `(task, [(trial, success, steps)])`."""
    import torch

    suite, task, trials, init, assets = job
    torch.set_num_threads(1)
    name = f"libero:{suite}/{task}"
    env = make_env(name, cameras=(), init=init, assets=assets)
    expert = expert_factory(name)(env)
    results = []
    for trial in trials:
        episode = play_episode(expert, env, trial)
        results.append((trial, episode.success, episode.length))
    env.close()
    return task, results


def check_expert(
    suite: str,
    tasks: Sequence[int] | None,
    trials: Sequence[int],
    workers: int = 1,
    init: str = "suite",
    assets: str | None = None,
    progress: bool = True,
    on_result: Callable[[dict[int, list[tuple[int, bool, int]]]], None] | None = None,
    trials_per_job: int = 5,
) -> dict[int, list[tuple[int, bool, int]]]:
    """Success of the expert on every (task, trial) without rendering; `{task: [(trial, success, steps)]}`.

    `tasks`: task ids of the suite (None: all). `init="suite"`: trial = the suite's init state (0..49, the
    evaluation protocol's); `"sampled"`: a fresh placement seeded by the trial. Jobs of `trials_per_job` trials run
    in `workers` spawned processes (one torch thread each), the first trials of every task before the later ones,
    so a stopped run has covered every task; `on_result` sees the results so far after each job.
    """
    tasks = list(range(len(get_suite(suite).tasks))) if tasks is None else [int(t) for t in tasks]
    trials = list(trials)
    if workers <= 0 or not tasks or not trials:
        raise ConfigError(f"check_expert: expected workers > 0 and at least one task and trial, got {workers}, {tasks}, {trials}.")
    jobs = [(suite, task, trials[i : i + trials_per_job], init, assets) for i in range(0, len(trials), trials_per_job) for task in tasks]
    results: dict[int, list[tuple[int, bool, int]]] = {task: [] for task in tasks}
    bar = tqdm(total=len(tasks) * len(trials), desc=f"expert {suite}", unit="episode", disable=not progress)
    with contextlib.ExitStack() as stack:
        if workers == 1:
            outcomes: Iterator[tuple[int, list[tuple[int, bool, int]]]] = map(_check_task, jobs)
        else:  # spawned interpreters: no forked simulator or torch state
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))))
            outcomes = pool.imap_unordered(_check_task, jobs)
        for task, rows in outcomes:
            results[task].extend(rows)
            bar.update(len(rows))
            done = [ok for task_rows in results.values() for _, ok, _ in task_rows]
            bar.set_postfix(success=f"{sum(done)}/{len(done)}")
            if on_result is not None:
                on_result({t: sorted(r) for t, r in results.items()})
    bar.close()
    return {task: sorted(rows) for task, rows in results.items()}


def format_expert_table(suite: str, init: str, results: dict[int, list[tuple[int, bool, int]]]) -> str:
    """`check_expert`'s results as a markdown table per task (episodes, successes, mean steps of the successes) and a total line."""
    lines = ["| task | episodes | successes | mean steps (successes) |", "|---:|---:|---:|---:|"]
    for task, rows in results.items():
        wins = [steps for _, ok, steps in rows if ok]
        lines.append(f"| {task} | {len(rows)} | {len(wins)} | {f'{sum(wins) / len(wins):.0f}' if wins else '-'} |")
    total = sum(len(rows) for rows in results.values())
    wins = sum(ok for rows in results.values() for _, ok, _ in rows)
    return "\n".join(lines) + f"\n\nexpert on {suite} ({init} init): {wins}/{total} successes ({100 * wins / total:.1f} %)"
