"""Closed-loop evaluation: run a policy in an environment on fixed seeds and report success, length and speed.

Any object with `reset()`, `act(obs) -> [7]` and `stats()` is a policy here (MainOnlyPolicy, SpeculativePolicy,
or a scripted adapter in tests), so the baseline and the speculative policy are compared on the same seeds.
Acceptance covers only this call (from the `calls` / `acceptance_rate` counters before and after); latency is
the policy's per-chunk "total" stage over its rolling window (its last 2000 chunk predictions), so evaluate a
fresh policy for latency that covers exactly this run. Videos: GIF needs nothing extra; MP4 needs imageio-ffmpeg.
`compare_policies` runs the main-only baseline and the speculative policy of a bundle on the same seeds (what
`rsd eval` and `rsd demo` report). `evaluate_parallel` spreads the episodes over spawned worker processes (a
rendered LIBERO episode takes minutes on a CPU): each worker loads its own policy (`PolicySpec`) and env and plays
its seeds with the same `play_episode`; the parent merges the episodes in seed order and the acceptance exactly
from the workers' chunk counts. Latency is not reported for parallel runs (the processes share the cores;
`rsd bench-latency` measures speed).

Side by side in one process: `evaluate(..., batch=N)` plays N episodes at once on replicas of the policy, one env
each, and predicts the chunks of all that replan in one batch (`play_batch`): on a CPU a batch of 50 costs about a
fifth of 50 single calls, and every seed plays the episode it plays alone (up to the rounding of batched arithmetic).
No latency is reported then.

Spread over processes: `compare_on_ranks` gives each rank of the process group (torchrun's, or the local ranks
`compare_in_processes` starts for `rsd eval --workers N`) every world_size-th seed, and `merge_reports` joins
the ranks' reports on rank 0: episodes in seed order, acceptance weighted by each rank's chunk count. Latency is
left out of a merged report (processes sharing a machine slow each other; `rsd bench-latency` measures speed).

Usage:
    report = evaluate(policy, "tabletop", seeds=list(range(10_000, 10_050)), video_dir="runs/eval/videos")
    print(report.to_markdown()); json.dumps(report.to_json())
    reports = compare_policies("runs/demo/policy", "tabletop", range(10_000, 10_050), bundle="runs/demo/bundle", workers=2)
    print(format_comparison(reports))
    reports = compare_in_processes(2, "runs/demo/policy", "tabletop", range(10_000, 10_050))   # the same outcomes per seed
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rsd import distributed
from rsd.device import resolve_device_dtype
from rsd.envs.base import Env, make_env
from rsd.errors import ConfigError
from rsd.models.main import MainModel
from rsd.runtime.policy import MainOnlyPolicy, SpeculativePolicy, load_main

WILSON_Z = 1.959964  # standard normal quantile of a two-sided 95 % interval
VIDEO_MIN_SIDE = 256  # frames are upscaled (nearest) to at least this side so small renders stay watchable
VIDEO_FPS = 20
SEEDS_PER_JOB = 5  # seeds a parallel worker plays before reporting back (progress granularity)


def wilson_interval(successes: int, episodes: int, z: float = WILSON_Z) -> tuple[float, float]:
    """95 % Wilson score interval `(low, high)` of a success rate from `successes` of `episodes` (sound at 0 and n)."""
    if episodes <= 0 or not 0 <= successes <= episodes:
        raise ConfigError(f"wilson_interval: expected 0 <= successes <= episodes and episodes > 0, got {successes}/{episodes}.")
    rate = successes / episodes
    denominator = 1.0 + z**2 / episodes
    centre = (rate + z**2 / (2 * episodes)) / denominator
    half = z * math.sqrt(rate * (1.0 - rate) / episodes + z**2 / (4 * episodes**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def format_rate(successes: int, episodes: int) -> str:
    """"k/n (r %, 95 % CI lo–hi %)": a success rate with its count and Wilson interval."""
    low, high = wilson_interval(successes, episodes)
    return f"{successes}/{episodes} ({100 * successes / episodes:.1f} %, 95 % CI {100 * low:.1f}–{100 * high:.1f} %)"


@dataclass
class EpisodeResult:
    """The outcome of one evaluation episode."""

    seed: int  # the env seed
    instruction: str  # the episode's language instruction
    task_family: str  # task kind, for the per-task table
    success: bool  # the env reported success before the timeout
    length: int  # steps taken


@dataclass
class EvalReport:
    """Results of `evaluate`: episodes, and the policy's acceptance rate and latency over the run."""

    episodes: list[EpisodeResult]  # one entry per seed, in seed order
    acceptance_rate: float | None  # share of chunks whose draft was accepted; None for the main-only policy
    latency_ms: dict[str, float] | None  # {"p50", "mean"} of the per-chunk "total" time, None without timings
    policy: str = ""  # the policy's class name
    chunks: int | None = None  # chunk predictions during the run (None: the policy counts none); weights acceptance in merges

    @property
    def success_rate(self) -> float:
        """Share of successful episodes."""
        return float(np.mean([e.success for e in self.episodes]))

    @property
    def mean_length(self) -> float:
        """Mean episode length in steps."""
        return float(np.mean([e.length for e in self.episodes]))

    @property
    def per_task(self) -> dict[str, dict[str, Any]]:
        """`{task_family: {"episodes", "successes", "success_rate", "wilson_95"}}`, sorted by task."""
        table: dict[str, dict[str, Any]] = {}
        for family in sorted({e.task_family for e in self.episodes}):
            outcomes = [e.success for e in self.episodes if e.task_family == family]
            table[family] = {"episodes": len(outcomes), "successes": sum(outcomes), "success_rate": sum(outcomes) / len(outcomes),
                             "wilson_95": list(wilson_interval(sum(outcomes), len(outcomes)))}
        return table

    @property
    def successes(self) -> int:
        """Number of successful episodes."""
        return sum(e.success for e in self.episodes)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: success_rate, mean_length, acceptance_rate, chunks, latency_ms, per_task, episodes, policy."""
        return {
            "success_rate": self.success_rate,
            "episodes_run": len(self.episodes),
            "successes": self.successes,
            "wilson_95": list(wilson_interval(self.successes, len(self.episodes))),
            "mean_length": self.mean_length,
            "acceptance_rate": self.acceptance_rate,
            "chunks": self.chunks,
            "latency_ms": self.latency_ms,
            "per_task": self.per_task,
            "episodes": [asdict(e) for e in self.episodes],
            "policy": self.policy,
        }

    def to_markdown(self) -> str:
        """A per-task success table (with 95 % Wilson intervals) followed by one overall line."""
        lines = ["| task | episodes | successes | success rate | 95 % CI |", "|---|---:|---:|---:|---:|"]
        for family, row in self.per_task.items():
            low, high = row["wilson_95"]
            lines.append(f"| {family} | {row['episodes']} | {row['successes']} | {100 * row['success_rate']:.1f} % | {100 * low:.1f}–{100 * high:.1f} % |")
        overall = f"**{self.policy or 'policy'}**: {format_rate(self.successes, len(self.episodes))} successes, mean length {self.mean_length:.1f} steps"
        if self.acceptance_rate is not None:
            overall += f", acceptance {100 * self.acceptance_rate:.1f} %"
        if self.latency_ms is not None:
            overall += f", chunk latency p50 {self.latency_ms['p50']:.2f} ms (mean {self.latency_ms['mean']:.2f} ms)"
        return "\n".join(lines) + "\n\n" + overall + "\n"


def _accepted_chunks(before: dict[str, Any], after: dict[str, Any]) -> tuple[int, int] | None:
    """`(accepted, calls)`: the chunk predictions made between two `policy.stats()` snapshots; None without counters or calls."""
    rate_after = after.get("acceptance_rate")
    if rate_after is None or "calls" not in after:
        return None
    calls_before, calls_after = int(before.get("calls", 0)), int(after["calls"])
    if calls_after <= calls_before:
        return None
    accepted_before = round(before["acceptance_rate"] * calls_before) if calls_before else 0
    return round(rate_after * calls_after) - accepted_before, calls_after - calls_before


def _acceptance(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Acceptance rate over the calls made between two `policy.stats()` snapshots (None when unknown)."""
    rate_after = after.get("acceptance_rate")
    if rate_after is not None and "calls" not in after:  # no counters: the rate as the policy reports it
        return None if math.isnan(rate_after) else float(rate_after)
    counts = _accepted_chunks(before, after)
    return None if counts is None else counts[0] / counts[1]


def _latency(stats: dict[str, Any]) -> dict[str, float] | None:
    """p50 and mean of the "total" stage of `policy.stats()`, if it has one."""
    total = stats.get("stages", {}).get("total", {})
    return {"p50": float(total["p50"]), "mean": float(total["mean"])} if total.get("n") else None


def _write_video(path: Path, frames: list[np.ndarray], video_format: str) -> None:
    """Write frames `[H, W, 3]` as a GIF or MP4, upscaled by an integer factor to at least VIDEO_MIN_SIDE."""
    import imageio.v2 as imageio
    import imageio.v3 as iio

    factor = max(1, math.ceil(VIDEO_MIN_SIDE / frames[0].shape[0]))
    big = np.stack(frames).repeat(factor, axis=1).repeat(factor, axis=2)
    if video_format == "gif":
        iio.imwrite(path, big, extension=".gif", duration=1000 / VIDEO_FPS, loop=0)  # pillow: duration in ms
    else:
        imageio.mimwrite(path, list(big), format="FFMPEG", fps=VIDEO_FPS, macro_block_size=1)


def _check_video_options(video_dir: str | Path | None, video_format: str) -> None:
    """A ConfigError for a video format other than gif/mp4, or mp4 without imageio-ffmpeg; creates `video_dir`."""
    if video_format not in ("gif", "mp4"):
        raise ConfigError(f"evaluate.video_format: expected 'gif' or 'mp4', got {video_format!r}.")
    if video_dir is not None and video_format == "mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ConfigError("evaluate: expected imageio-ffmpeg for MP4 videos, got none installed; use --video-format gif or pip install imageio-ffmpeg.")
    if video_dir is not None:
        Path(video_dir).mkdir(parents=True, exist_ok=True)


def play_episode(policy: Any, world: Env, seed: int, video_dir: str | Path | None = None, video_format: str = "gif") -> EpisodeResult:
    """One episode of `policy` (`reset()`, `act(obs)`) in `world` from `seed`, ended by the env (success or max_steps).

    With `video_dir` the episode's frames are written there as `seed<seed>_<success|failure>.<video_format>`.
    """
    obs = world.reset(seed)
    policy.reset()
    instruction = obs["instruction"]
    family = str(world.task_family)
    frames = [world.render()] if video_dir is not None else None
    success, done, length = False, False, 0
    while not done and length < world.max_steps:  # the env ends the episode by max_steps at the latest
        obs, _, done, info = world.step(policy.act(obs))
        length += 1
        success = bool(info["success"])
        if frames is not None:
            frames.append(world.render())
    if frames is not None:
        _write_video(Path(video_dir) / f"seed{seed}_{'success' if success else 'failure'}.{video_format}", frames, video_format)
    return EpisodeResult(int(seed), instruction, family, success, length)


@dataclass
class _Playing:
    """One episode in progress in a slot of `side_by_side`."""

    index: int  # position of its seed
    obs: dict[str, Any]  # the latest observation
    steps: int = 0


def side_by_side(policies: Sequence[Any], worlds: Sequence[Env], seeds: Sequence[int],
                 limits: Sequence[int] | None = None) -> Iterator[tuple[int, int, dict[str, Any], int, bool, dict[str, Any]]]:
    """Play one episode per seed, one per slot (a policy replica on a shared engine and its own env) side by side: each
    step predicts the chunks of every replanning slot in one batch (`rsd.runtime.policy.act_batch`).

    An episode ends when its env says done or after `limits[i]` steps (None: the env's `max_steps`); then this yields
    `(i, slot, last observation, steps, done, info)`, with the slot's env as the episode left it, and the slot takes
    the next seed once the caller asks for the next item. Each episode is the one its policy plays alone.
    """
    from rsd.runtime.policy import act_batch

    if not policies or len(policies) != len(worlds):
        raise ConfigError(f"side_by_side: expected one env per policy and at least one, got {len(policies)} policies and {len(worlds)} envs.")
    if limits is not None and len(limits) != len(seeds):
        raise ConfigError(f"side_by_side: expected one step limit per seed, got {len(limits)} for {len(seeds)} seeds.")
    waiting = list(range(len(seeds)))[::-1]
    playing: dict[int, _Playing] = {}

    def start(slot: int) -> None:
        index = waiting.pop()
        policies[slot].reset()
        playing[slot] = _Playing(index, worlds[slot].reset(int(seeds[index])))

    for slot in range(min(len(policies), len(waiting))):
        start(slot)
    while playing:
        slots = list(playing)
        for slot, action in zip(slots, act_batch([policies[slot] for slot in slots], [playing[slot].obs for slot in slots]), strict=True):
            episode = playing[slot]
            episode.obs, _, done, info = worlds[slot].step(np.asarray(action, dtype=np.float32))
            episode.steps += 1
            if done or episode.steps >= (worlds[slot].max_steps if limits is None else limits[episode.index]):
                del playing[slot]
                yield episode.index, slot, episode.obs, episode.steps, done, info
                if waiting:
                    start(slot)


def play_batch(policies: Sequence[Any], worlds: Sequence[Env], seeds: Sequence[int]) -> list[EpisodeResult]:
    """The episodes of `seeds` played side by side (`side_by_side`), each ended by its env (success or max_steps) as
    `play_episode` ends it; the results in the order of `seeds`."""
    results: list[EpisodeResult | None] = [None] * len(seeds)
    for index, slot, obs, steps, _, info in side_by_side(policies, worlds, seeds):
        results[index] = EpisodeResult(int(seeds[index]), obs["instruction"], str(worlds[slot].task_family), bool(info["success"]), steps)
    return [result for result in results if result is not None]


def evaluate(
    policy: Any,
    env: str | Env,
    seeds: Sequence[int],
    video_dir: str | Path | None = None,
    video_format: str = "gif",
    progress: bool = True,
    env_kwargs: dict[str, Any] | None = None,
    batch: int = 1,
) -> EvalReport:
    """Run `policy` for one episode per seed in `env` (a name for `make_env`, or an Env); return the report.

    With `batch > 1`, that many episodes play side by side on replicas of the policy (`play_batch`, one env each, so
    `env` must be a name), with the same outcomes per seed; the report then has no latency (batched calls are not
    one chunk's) and no videos.
    """
    if not seeds:
        raise ConfigError("evaluate.seeds: expected at least one seed, got none.")
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"evaluate.batch: expected an int >= 1, got {batch!r}.")
    _check_video_options(video_dir, video_format)
    if batch > 1:
        return _evaluate_batched(policy, env, seeds, video_dir, env_kwargs, batch)
    world = make_env(env, **(env_kwargs or {})) if isinstance(env, str) else env
    before = policy.stats()
    results: list[EpisodeResult] = []
    bar = tqdm(seeds, desc=f"evaluate {type(policy).__name__}", unit="episode", disable=not progress)
    for seed in bar:
        results.append(play_episode(policy, world, seed, video_dir, video_format))
        bar.set_postfix(success=f"{np.mean([r.success for r in results]):.2f}")
    after = policy.stats()
    acceptance = None if type(policy).__name__ == "MainOnlyPolicy" else _acceptance(before, after)
    chunks = int(after["calls"]) - int(before.get("calls", 0)) if "calls" in after else None
    return EvalReport(results, acceptance, _latency(after), type(policy).__name__, chunks)


def _evaluate_batched(policy: Any, env: str | Env, seeds: Sequence[int], video_dir: str | Path | None,
                      env_kwargs: dict[str, Any] | None, batch: int) -> EvalReport:
    """`evaluate` with `batch` episodes side by side (`play_batch`) on replicas of `policy`."""
    if not isinstance(env, str):
        raise ConfigError(f"evaluate.batch: {batch} episodes side by side need an env each; expected the env's name, got a {type(env).__name__}.")
    if video_dir is not None:
        raise ConfigError("evaluate.batch: videos are recorded one episode at a time; use batch=1 with video_dir.")
    if not hasattr(policy, "replica"):
        raise ConfigError(f"evaluate.batch: expected a policy with replica() (MainOnlyPolicy, SpeculativePolicy), got {type(policy).__name__}.")
    slots = min(batch, len(seeds))
    policies = [policy] + [policy.replica() for _ in range(slots - 1)]
    worlds = [make_env(env, **(env_kwargs or {})) for _ in range(slots)]
    try:
        before = [p.stats() for p in policies]
        results = play_batch(policies, worlds, seeds)
    finally:
        for world in worlds:
            world.close()
    after = [p.stats() for p in policies]
    counts = [_accepted_chunks(b, a) for b, a in zip(before, after, strict=True)]
    chunks = sum(int(a["calls"]) - int(b["calls"]) for b, a in zip(before, after, strict=True))
    accepted = sum(c[0] for c in counts if c is not None)
    acceptance = None if type(policy).__name__ == "MainOnlyPolicy" or not chunks else accepted / chunks
    return EvalReport(results, acceptance, None, type(policy).__name__, chunks)


@dataclass(frozen=True)
class PolicySpec:
    """Which policy runs on a main model: the baseline, or with a bundle the speculative policy at a threshold."""

    bundle: str | None = None  # exported bundle: SpeculativePolicy; None: MainOnlyPolicy
    engine: str = "auto"  # bundle engine
    tau: float | None = None  # gate threshold (None: the bundle's)
    replan_every: int | None = None  # steps executed from each chunk before replanning (None: the whole chunk)

    @property
    def name(self) -> str:
        """The policy class it builds."""
        return "SpeculativePolicy" if self.bundle else "MainOnlyPolicy"

    def build(self, main: MainModel) -> Any:
        """The policy on `main`."""
        if self.bundle:
            return SpeculativePolicy.from_bundle(self.bundle, main=main, engine=self.engine, tau=self.tau, replan_every=self.replan_every)
        return MainOnlyPolicy(main, self.replan_every)


_WORKER: dict[str, Any] = {}


def _init_worker(policy_dir: str, device: str | None, spec: dict[str, Any], env_name: str, env_kwargs: dict[str, Any]) -> None:
    """Build this worker's policy and env once (one torch thread)."""
    import torch

    torch.set_num_threads(1)
    _WORKER.update(policy=PolicySpec(**spec).build(load_main(policy_dir, device, None)), env=make_env(env_name, **env_kwargs))


def _play(job: tuple[list[int], str | None, str]) -> tuple[list[dict[str, Any]], tuple[int, int] | None]:
    """Play `seeds` with this worker's policy; the episodes as dicts and the `(accepted, calls)` chunk counts."""
    seeds, video_dir, video_format = job
    policy = _WORKER["policy"]
    before = policy.stats()
    episodes = [asdict(play_episode(policy, _WORKER["env"], seed, video_dir, video_format)) for seed in seeds]
    return episodes, _accepted_chunks(before, policy.stats())


def evaluate_parallel(
    policy_dir: str | Path,
    spec: PolicySpec,
    env: str,
    seeds: Sequence[int],
    workers: int,
    env_kwargs: dict[str, Any] | None = None,
    video_dir: str | Path | None = None,
    video_format: str = "gif",
    device: str | None = None,
    progress: bool = True,
    seeds_per_job: int = SEEDS_PER_JOB,
) -> EvalReport:
    """Evaluate `spec`'s policy on the main model in `policy_dir` on every seed of `env` (a `make_env` name) in
    `workers` spawned processes, each loading the model on `device` and building its own env.

    Seeds go to the workers in contiguous runs of `seeds_per_job` (LIBERO's suite mode keeps one task per run of 50
    seeds, so a worker rarely rebuilds its simulator); every episode is played by `play_episode`, as in `evaluate`.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("evaluate_parallel.seeds: expected at least one seed, got none.")
    if not isinstance(env, str):
        raise ConfigError(f"evaluate_parallel.env: expected an environment name (each worker builds its own), got {type(env).__name__}.")
    if workers <= 0 or seeds_per_job <= 0:
        raise ConfigError(f"evaluate_parallel: expected workers > 0 and seeds_per_job > 0, got {workers} and {seeds_per_job}.")
    _check_video_options(video_dir, video_format)
    jobs = [(seeds[i : i + seeds_per_job], None if video_dir is None else str(video_dir), video_format) for i in range(0, len(seeds), seeds_per_job)]
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked GL contexts or torch threads
    episodes: list[EpisodeResult] = []
    accepted = calls = 0
    bar = tqdm(total=len(seeds), desc=f"evaluate {spec.name} x{workers}", unit="episode", disable=not progress)
    with context.Pool(min(workers, len(jobs)), initializer=_init_worker,
                      initargs=(str(policy_dir), device, asdict(spec), env, env_kwargs or {})) as pool:
        for results, counts in pool.imap_unordered(_play, jobs):
            episodes.extend(EpisodeResult(**r) for r in results)
            if counts is not None:
                accepted, calls = accepted + counts[0], calls + counts[1]
            bar.update(len(results))
            bar.set_postfix(success=f"{np.mean([e.success for e in episodes]):.2f}")
    bar.close()
    episodes.sort(key=lambda e: e.seed)
    return EvalReport(episodes, accepted / calls if spec.bundle and calls else None, None, spec.name)


def compare_policies(
    main: MainModel | str | Path,
    env: str | Env,
    seeds: Sequence[int],
    bundle: str | Path | None = None,
    engine: str = "auto",
    taus: Mapping[str, float | None] | None = None,
    video_dir: str | Path | None = None,
    video_format: str = "gif",
    env_kwargs: dict[str, Any] | None = None,
    device: str | None = None,
    workers: int = 1,
    progress: bool = True,
    replan_every: int | None = None,
    batch: int = 1,
) -> dict[str, EvalReport]:
    """`MainOnlyPolicy` ("baseline") and, with a bundle, `SpeculativePolicy` on the same seeds; one report per policy.

    `main` is the loaded main model or its policy folder (loaded on `device`). `taus` names the speculative
    policies: `{"speculative": None}` (the bundle's own tau) unless given; every entry runs the bundle's engines at
    that threshold (None: the bundle's). Videos go to `video_dir/<policy name>`. With `workers > 1` every policy
    is evaluated by `evaluate_parallel`, whose workers load the folder themselves (so `main` must be the folder).
    Every policy executes `replan_every` steps of each chunk before it replans (None: the whole chunk); `batch`
    episodes play side by side (`evaluate`'s; not with `workers > 1`).
    """
    if workers <= 0:
        raise ConfigError(f"compare_policies.workers: expected an int > 0, got {workers}.")
    if workers > 1 and batch > 1:
        raise ConfigError(f"compare_policies: batch {batch} plays episodes side by side in one process; workers {workers} spread them over "
                          "processes that play one at a time. Choose one (rsd eval --workers N keeps --batch in each rank).")
    if workers > 1 and isinstance(main, MainModel):
        raise ConfigError("compare_policies: workers > 1 load the policy in every worker process; expected its folder, got a loaded MainModel.")
    specs = {"baseline": PolicySpec(replan_every=replan_every)}
    if bundle is not None:
        for name, tau in (taus or {"speculative": None}).items():
            specs[name] = PolicySpec(str(bundle), engine, tau, replan_every)
    videos = {name: None if video_dir is None else Path(video_dir) / name for name in specs}
    if workers > 1:
        return {name: evaluate_parallel(main, spec, env, seeds, workers, env_kwargs, videos[name], video_format, device)
                for name, spec in specs.items()}
    model = main if isinstance(main, MainModel) else load_main(main, device, None)
    return {name: evaluate(spec.build(model), env, seeds, video_dir=videos[name], video_format=video_format, progress=progress, env_kwargs=env_kwargs,
                           batch=batch)
            for name, spec in specs.items()}


def format_comparison(reports: Mapping[str, EvalReport]) -> str:
    """One line: the speculative policy's success and chunk latency against the baseline's ("" without both)."""
    if "baseline" not in reports or "speculative" not in reports:
        return ""
    base, spec = reports["baseline"], reports["speculative"]
    line = (f"speculative vs baseline: success {format_rate(spec.successes, len(spec.episodes))} vs "
            f"{format_rate(base.successes, len(base.episodes))}")
    if base.latency_ms and spec.latency_ms:
        line += (f", chunk latency p50 {spec.latency_ms['p50']:.2f} ms vs {base.latency_ms['p50']:.2f} ms "
                 f"({base.latency_ms['p50'] / spec.latency_ms['p50']:.2f}x)")
    return line


def merge_reports(parts: Sequence[EvalReport]) -> EvalReport:
    """One report from the reports of one policy on disjoint seed shares: episodes in seed order, acceptance
    weighted by each part's chunk count, latency only for a single part."""
    if not parts:
        raise ConfigError("merge_reports.parts: expected at least one report, got none.")
    if len(parts) == 1:
        return parts[0]
    episodes = sorted((e for part in parts for e in part.episodes), key=lambda e: e.seed)
    seeds = [e.seed for e in episodes]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"merge_reports: expected disjoint seed shares, got seeds played twice: {sorted({s for s in seeds if seeds.count(s) > 1})}.")
    rated = [part for part in parts if part.acceptance_rate is not None and part.chunks]
    acceptance = sum(p.acceptance_rate * p.chunks for p in rated) / sum(p.chunks for p in rated) if rated else None
    chunks = sum(p.chunks for p in parts) if all(p.chunks is not None for p in parts) else None
    return EvalReport(episodes, acceptance, None, parts[0].policy, chunks)


def compare_on_ranks(
    policy: str | Path,
    env: str,
    seeds: Sequence[int],
    bundle: str | Path | None = None,
    engine: str = "auto",
    taus: Mapping[str, float | None] | None = None,
    device: str | None = None,
    video_dir: str | Path | None = None,
    video_format: str = "gif",
    env_kwargs: dict[str, Any] | None = None,
    replan_every: int | None = None,
    batch: int = 1,
) -> dict[str, EvalReport] | None:
    """`compare_policies` with the seeds spread over the ranks: each loads the policy folder on its own device and
    plays `World.shard(seeds)`; rank 0 returns the merged reports, the other ranks None (alone: the plain run)."""
    world = distributed.current()
    torch_device, torch_dtype = resolve_device_dtype(device, None)
    main = MainModel.load(policy, device=world.device(torch_device), dtype=torch_dtype)
    mine = world.shard([int(s) for s in seeds])
    reports = compare_policies(main, env, mine, bundle=bundle, engine=engine, taus=taus, video_dir=video_dir, video_format=video_format,
                               env_kwargs=env_kwargs, progress=world.is_main, replan_every=replan_every, batch=batch) if mine else {}
    parts = world.gather(reports)
    if not world.is_main:
        return None
    names = dict.fromkeys(name for part in parts for name in part)
    return {name: merge_reports([part[name] for part in parts if name in part]) for name in names}


def _compare_in_session(kwargs: dict[str, Any]) -> dict[str, EvalReport] | None:
    with distributed.session():
        return compare_on_ranks(**kwargs)


def compare_in_processes(workers: int, policy: str | Path, env: str, seeds: Sequence[int], **options: Any) -> dict[str, EvalReport]:
    """`compare_on_ranks` in `workers` local ranks started by torch's elastic launcher (`rsd eval --workers N`).

    `options` are `compare_on_ranks`'s keyword arguments. The ranks are forked (they start in a second and run no
    backward pass), so this process must hold no CUDA context; each gets its share of this process's torch threads.
    """
    if workers < 1:
        raise ConfigError(f"rsd eval --workers: expected an int >= 1, got {workers}.")
    kwargs = {"policy": policy, "env": env, "seeds": list(seeds), **options}
    return distributed.run_local(workers, _compare_in_session, kwargs, start_method="fork")[0]
