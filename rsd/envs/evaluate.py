"""Closed-loop evaluation: run a policy in an environment on fixed seeds and report success, length and speed.

Any object with `reset()`, `act(obs) -> [7]` and `stats()` is a policy here (MainOnlyPolicy, SpeculativePolicy,
or a scripted adapter in tests), so the baseline and the speculative policy are compared on the same seeds.
Acceptance covers only this call (from the `calls` / `acceptance_rate` counters before and after); latency is
the policy's per-chunk "total" stage over its rolling window (its last 2000 chunk predictions), so evaluate a
fresh policy for latency that covers exactly this run. Videos: GIF needs nothing extra; MP4 needs imageio-ffmpeg.
`compare_policies` runs the main-only baseline and the speculative policy of a bundle on the same seeds (what
`rsd eval` and `rsd demo` report).

Spread over processes: `compare_on_ranks` gives each rank of the process group (torchrun's, or the local ranks
`compare_in_processes` starts for `rsd eval --workers N`) every world_size-th seed, and `merge_reports` joins
the ranks' reports on rank 0: episodes in seed order, acceptance weighted by each rank's chunk count. Latency is
left out of a merged report (processes sharing a machine slow each other; `rsd bench-latency` measures speed).

Usage:
    report = evaluate(policy, "tabletop", seeds=list(range(10_000, 10_050)), video_dir="runs/eval/videos")
    print(report.to_markdown()); json.dumps(report.to_json())
    reports = compare_policies(load_main("runs/demo/policy", None, None), "tabletop", range(10_000, 10_050), bundle="runs/demo/bundle")
    print(format_comparison(reports))
    reports = compare_in_processes(2, "runs/demo/policy", "tabletop", range(10_000, 10_050))   # the same outcomes per seed
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
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
from rsd.runtime.policy import MainOnlyPolicy, SpeculativePolicy

VIDEO_MIN_SIDE = 256  # frames are upscaled (nearest) to at least this side so small renders stay watchable
VIDEO_FPS = 20


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
    def per_task(self) -> dict[str, dict[str, float]]:
        """`{task_family: {"episodes", "successes", "success_rate"}}`, sorted by task."""
        table: dict[str, dict[str, float]] = {}
        for family in sorted({e.task_family for e in self.episodes}):
            outcomes = [e.success for e in self.episodes if e.task_family == family]
            table[family] = {"episodes": len(outcomes), "successes": sum(outcomes), "success_rate": sum(outcomes) / len(outcomes)}
        return table

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: success_rate, mean_length, acceptance_rate, chunks, latency_ms, per_task, episodes, policy."""
        return {
            "success_rate": self.success_rate,
            "mean_length": self.mean_length,
            "acceptance_rate": self.acceptance_rate,
            "chunks": self.chunks,
            "latency_ms": self.latency_ms,
            "per_task": self.per_task,
            "episodes": [asdict(e) for e in self.episodes],
            "policy": self.policy,
        }

    def to_markdown(self) -> str:
        """A per-task success table followed by one overall line."""
        lines = ["| task | episodes | successes | success rate |", "|---|---:|---:|---:|"]
        for family, row in self.per_task.items():
            lines.append(f"| {family} | {row['episodes']} | {row['successes']} | {100 * row['success_rate']:.1f} % |")
        successes = sum(e.success for e in self.episodes)
        overall = f"**{self.policy or 'policy'}**: {successes}/{len(self.episodes)} successes ({100 * self.success_rate:.1f} %), mean length {self.mean_length:.1f} steps"
        if self.acceptance_rate is not None:
            overall += f", acceptance {100 * self.acceptance_rate:.1f} %"
        if self.latency_ms is not None:
            overall += f", chunk latency p50 {self.latency_ms['p50']:.2f} ms (mean {self.latency_ms['mean']:.2f} ms)"
        return "\n".join(lines) + "\n\n" + overall + "\n"


def _acceptance(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Acceptance rate over the calls made between two `policy.stats()` snapshots (None when unknown)."""
    rate_after = after.get("acceptance_rate")
    if rate_after is None or "calls" not in after:  # no counters: the rate as the policy reports it
        return None if rate_after is None or math.isnan(rate_after) else float(rate_after)
    calls_before, calls_after = int(before.get("calls", 0)), int(after["calls"])
    if calls_after <= calls_before:
        return None
    accepted_before = round(before["acceptance_rate"] * calls_before) if calls_before else 0
    rate = (round(rate_after * calls_after) - accepted_before) / (calls_after - calls_before)
    return None if math.isnan(rate) else float(rate)


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


def evaluate(
    policy: Any,
    env: str | Env,
    seeds: Sequence[int],
    video_dir: str | Path | None = None,
    video_format: str = "gif",
    progress: bool = True,
    env_kwargs: dict[str, Any] | None = None,
) -> EvalReport:
    """Run `policy` for one episode per seed in `env` (a name for `make_env`, or an Env); return the report."""
    if not seeds:
        raise ConfigError("evaluate.seeds: expected at least one seed, got none.")
    if video_format not in ("gif", "mp4"):
        raise ConfigError(f"evaluate.video_format: expected 'gif' or 'mp4', got {video_format!r}.")
    if video_dir is not None and video_format == "mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ConfigError("evaluate: expected imageio-ffmpeg for MP4 videos, got none installed; use --video-format gif or pip install imageio-ffmpeg.")
    world = make_env(env, **(env_kwargs or {})) if isinstance(env, str) else env
    if video_dir is not None:
        Path(video_dir).mkdir(parents=True, exist_ok=True)
    before = policy.stats()
    results: list[EpisodeResult] = []
    bar = tqdm(seeds, desc=f"evaluate {type(policy).__name__}", unit="episode", disable=not progress)
    for seed in bar:
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
        results.append(EpisodeResult(int(seed), instruction, family, success, length))
        if frames is not None:
            _write_video(Path(video_dir) / f"seed{seed}_{'success' if success else 'failure'}.{video_format}", frames, video_format)
        bar.set_postfix(success=f"{np.mean([r.success for r in results]):.2f}")
    after = policy.stats()
    acceptance = None if type(policy).__name__ == "MainOnlyPolicy" else _acceptance(before, after)
    chunks = int(after["calls"]) - int(before.get("calls", 0)) if "calls" in after else None
    return EvalReport(results, acceptance, _latency(after), type(policy).__name__, chunks)


def compare_policies(
    main: MainModel,
    env: str | Env,
    seeds: Sequence[int],
    bundle: str | Path | None = None,
    engine: str = "auto",
    taus: Mapping[str, float | None] | None = None,
    video_dir: str | Path | None = None,
    video_format: str = "gif",
    env_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, EvalReport]:
    """`MainOnlyPolicy` ("baseline") and, with a bundle, `SpeculativePolicy` on the same seeds; one report per policy.

    `taus` names the speculative policies: `{"speculative": None}` (the bundle's own tau) unless given; every entry
    runs the bundle's engines at that threshold (None: the bundle's). Videos go to `video_dir/<policy name>`.
    """
    policies: dict[str, Any] = {"baseline": MainOnlyPolicy(main)}
    if bundle is not None:
        for name, tau in (taus or {"speculative": None}).items():
            policies[name] = SpeculativePolicy.from_bundle(bundle, main=main, engine=engine, tau=tau)
    return {name: evaluate(policy, env, seeds, video_dir=None if video_dir is None else Path(video_dir) / name,
                           video_format=video_format, progress=progress, env_kwargs=env_kwargs)
            for name, policy in policies.items()}


def format_comparison(reports: Mapping[str, EvalReport]) -> str:
    """One line: the speculative policy's success and chunk latency against the baseline's ("" without both)."""
    if "baseline" not in reports or "speculative" not in reports:
        return ""
    base, spec = reports["baseline"], reports["speculative"]
    line = f"speculative vs baseline: success {100 * spec.success_rate:.1f} % vs {100 * base.success_rate:.1f} %"
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
) -> dict[str, EvalReport] | None:
    """`compare_policies` with the seeds spread over the ranks: each loads the policy folder on its own device and
    plays `World.shard(seeds)`; rank 0 returns the merged reports, the other ranks None (alone: the plain run)."""
    world = distributed.current()
    torch_device, torch_dtype = resolve_device_dtype(device, None)
    main = MainModel.load(policy, device=world.device(torch_device), dtype=torch_dtype)
    mine = world.shard([int(s) for s in seeds])
    reports = compare_policies(main, env, mine, bundle=bundle, engine=engine, taus=taus, video_dir=video_dir, video_format=video_format,
                               env_kwargs=env_kwargs, progress=world.is_main) if mine else {}
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
