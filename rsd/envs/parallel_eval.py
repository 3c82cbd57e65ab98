"""Closed-loop evaluation spread over worker processes: each loads its own policy and env and plays a share of seeds.

A rendered LIBERO episode takes minutes on a CPU, so `rsd eval --workers N` runs N spawned processes (one torch
thread each). Seeds go out in short contiguous runs (LIBERO's suite mode keeps one task per run of 50 seeds, so a
worker rarely rebuilds its simulator); every episode is played exactly as `rsd.envs.evaluate.evaluate` plays it,
and the parent merges the episodes in seed order. Acceptance is merged exactly from the workers' chunk counts.
Latency is not reported for parallel runs (the processes share the cores; `rsd bench-latency` measures speed).

Usage:
    spec = PolicySpec(policy="runs/libero/policy", bundle="runs/libero/bundle")
    report = evaluate_parallel(spec, "libero:libero_spatial", seeds=range(0, 100), workers=2)
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rsd.envs.evaluate import EpisodeResult, EvalReport
from rsd.errors import ConfigError

SEEDS_PER_JOB = 5  # seeds a worker plays before reporting back (progress granularity)


@dataclass(frozen=True)
class PolicySpec:
    """How a worker builds the policy: the main model's folder, and a bundle for the speculative policy."""

    policy: str  # policy folder (main model)
    bundle: str | None = None  # exported bundle: SpeculativePolicy; None: MainOnlyPolicy
    device: str | None = None  # cpu or cuda (None: resolved)
    engine: str = "auto"  # bundle engine
    tau: float | None = None  # gate threshold (None: the bundle's)

    @property
    def name(self) -> str:
        """The policy class a worker builds."""
        return "SpeculativePolicy" if self.bundle else "MainOnlyPolicy"


_WORKER: dict[str, Any] = {}


def _init_worker(spec: dict[str, Any], env_name: str, env_kwargs: dict[str, Any]) -> None:
    """Build this worker's policy and env once (one torch thread)."""
    import torch

    from rsd.envs.base import make_env
    from rsd.runtime.policy import MainOnlyPolicy, SpeculativePolicy, load_main

    torch.set_num_threads(1)
    policy_spec = PolicySpec(**spec)
    main = load_main(policy_spec.policy, policy_spec.device, None)
    if policy_spec.bundle:
        policy: Any = SpeculativePolicy.from_bundle(policy_spec.bundle, main=main, engine=policy_spec.engine, tau=policy_spec.tau)
    else:
        policy = MainOnlyPolicy(main)
    _WORKER.update(policy=policy, env=make_env(env_name, **env_kwargs))


def _play(job: tuple[list[int], str | None, str]) -> tuple[list[dict[str, Any]], int, int]:
    """Play `seeds` with this worker's policy; the episodes as dicts, and the chunk calls and accepted chunks."""
    from rsd.envs.evaluate import evaluate

    seeds, video_dir, video_format = job
    policy = _WORKER["policy"]
    before = policy.stats()
    report = evaluate(policy, _WORKER["env"], seeds, video_dir=video_dir, video_format=video_format, progress=False)
    after = policy.stats()
    calls = int(after.get("calls", 0)) - int(before.get("calls", 0))
    accepted = round(after["acceptance_rate"] * after["calls"]) - (round(before["acceptance_rate"] * before["calls"]) if before["calls"] else 0)
    return [asdict(e) for e in report.episodes], calls, accepted if calls else 0


def _chunks(seeds: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(seeds), size):
        yield list(seeds[start : start + size])


def evaluate_parallel(
    spec: PolicySpec,
    env: str,
    seeds: Sequence[int],
    workers: int,
    env_kwargs: dict[str, Any] | None = None,
    video_dir: str | Path | None = None,
    video_format: str = "gif",
    progress: bool = True,
    seeds_per_job: int = SEEDS_PER_JOB,
) -> EvalReport:
    """Evaluate the policy `spec` describes on every seed of `env` (a `make_env` name) in `workers` processes.

    Seeds go to the workers in contiguous runs of `seeds_per_job`.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("evaluate_parallel.seeds: expected at least one seed, got none.")
    if workers <= 0 or seeds_per_job <= 0:
        raise ConfigError(f"evaluate_parallel: expected workers > 0 and seeds_per_job > 0, got {workers} and {seeds_per_job}.")
    if video_dir is not None:
        Path(video_dir).mkdir(parents=True, exist_ok=True)
    jobs = [(chunk, None if video_dir is None else str(video_dir), video_format) for chunk in _chunks(seeds, seeds_per_job)]
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked GL contexts or torch threads
    episodes: list[EpisodeResult] = []
    calls = accepted = 0
    bar = tqdm(total=len(seeds), desc=f"evaluate {spec.name} x{workers}", unit="episode", disable=not progress)
    with context.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(asdict(spec), env, env_kwargs or {})) as pool:
        for results, job_calls, job_accepted in pool.imap_unordered(_play, jobs):
            episodes.extend(EpisodeResult(**r) for r in results)
            calls += job_calls
            accepted += job_accepted
            bar.update(len(results))
            bar.set_postfix(success=f"{sum(e.success for e in episodes) / len(episodes):.2f}")
    bar.close()
    episodes.sort(key=lambda e: e.seed)
    acceptance = accepted / calls if spec.bundle and calls else None
    return EvalReport(episodes, acceptance, None, spec.name)
