"""Closed-loop evaluation: run a policy in an environment on fixed seeds and report success, length and speed.

Any object with `reset()`, `act(obs) -> [7]` and `stats()` is a policy here (MainOnlyPolicy, SpeculativePolicy,
or a scripted adapter in tests), so the baseline and the speculative policy are compared on the same seeds.
Acceptance covers only this call (from the `calls` / `acceptance_rate` counters before and after); latency is
the policy's per-chunk "total" stage over its rolling window (its last 2000 chunk predictions), so evaluate a
fresh policy for latency that covers exactly this run. Videos: GIF needs nothing extra; MP4 needs imageio-ffmpeg.
`compare_policies` runs the main-only baseline and the speculative policy of a bundle on the same seeds (what
`rsd eval` and `rsd demo` report).

Usage:
    report = evaluate(policy, "tabletop", seeds=list(range(10_000, 10_050)), video_dir="runs/eval/videos")
    print(report.to_markdown()); json.dumps(report.to_json())
    reports = compare_policies(load_main("runs/demo/policy", None, None), "tabletop", range(10_000, 10_050), bundle="runs/demo/bundle")
    print(format_comparison(reports))
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

from rsd.envs.base import Env, make_env
from rsd.errors import ConfigError
from rsd.models.main import MainModel
from rsd.runtime.policy import MainOnlyPolicy, SpeculativePolicy

WILSON_Z = 1.959964  # standard normal quantile of a two-sided 95 % interval
VIDEO_MIN_SIDE = 256  # frames are upscaled (nearest) to at least this side so small renders stay watchable
VIDEO_FPS = 20


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
        """A JSON-ready dict: success_rate, mean_length, acceptance_rate, latency_ms, per_task, episodes, policy."""
        return {
            "success_rate": self.success_rate,
            "episodes_run": len(self.episodes),
            "successes": self.successes,
            "wilson_95": list(wilson_interval(self.successes, len(self.episodes))),
            "mean_length": self.mean_length,
            "acceptance_rate": self.acceptance_rate,
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
    return EvalReport(results, acceptance, _latency(after), type(policy).__name__)


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
                           video_format=video_format, env_kwargs=env_kwargs)
            for name, policy in policies.items()}


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
