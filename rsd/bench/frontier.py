"""sweep: the success–latency frontier of the speculative policy over gate settings, against main-only on the same seeds.

Acceptance and per-chunk latency do not say whether speculation pays: a gate that accepts often may cost the task,
and one that accepts little pays for the draft without skipping layers. So every policy — main-only first, then
the bundle's speculative policy at each gate setting — runs one episode per seed, interleaved seed by seed (so
that the load on a shared machine falls on all of them alike), through `rsd.envs.evaluate.evaluate`. Reported per
policy: success with the episode count and a 95 % Wilson interval, acceptance, leading steps executed per accepted
chunk, and the policy's compute time per control step (wall time inside `act`: observation checks, model and
queue; warm-up chunks excluded) with its ratio to main-only's.

Gate settings: the bundle's own gate, its threshold replaced by each of `taus`, and for each mode and risk level
`alpha` the gate `rsd.training.calibrate.calibrate` certifies on the draft's held-out episodes. The operating point
is picked by a rule: "within:P" — the fastest setting whose success is at least main-only's minus P points (the
point estimates on the same seeds; main-only when none qualifies); "fastest" — the fastest setting.

Usage:
    rsd sweep --policy runs/demo/policy --bundle runs/demo/bundle --env tabletop --episodes 100 \\
        --draft runs/demo/draft_k3 --features runs/demo/features_k3 --modes chunk,prefix --alphas 0.05,0.2 --rule within:5
    report = run_sweep(main, "runs/demo/bundle", "tabletop", range(10_000, 10_100), gate_settings(bundle_gate, taus=[0.5]))
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsd.bench.timing import hardware_card
from rsd.bundle import gate_steps_text, read_manifest
from rsd.envs.base import make_env
from rsd.envs.evaluate import EpisodeResult, EvalReport, evaluate, format_comparison, wilson_interval
from rsd.errors import ConfigError
from rsd.models.main import MainModel
from rsd.runtime.bundle import load_bundle_engines
from rsd.runtime.gate import Gate
from rsd.runtime.policy import MainOnlyPolicy, SpeculativePolicy, load_main
from rsd.runtime.speculative import SpeculativeEngine

BASELINE = "main-only"


@dataclass(frozen=True)
class GateSetting:
    """One speculative policy of the sweep: a name, its gate, and how the gate was obtained."""

    name: str  # row label, e.g. "prefix alpha=0.05"
    gate: Gate  # the gate the speculative policy runs
    source: dict[str, Any]  # "bundle", "tau" or the calibration's alpha, certified bound and test-half figures


class TimedPolicy:
    """A policy whose `act` calls are timed (wall clock), so compute per control step covers exactly the sweep."""

    def __init__(self, policy: MainOnlyPolicy | SpeculativePolicy) -> None:
        self.policy = policy
        self.seconds = 0.0
        self.steps = 0

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """The wrapped policy's action `[A]`, timed."""
        start = time.perf_counter()
        action = self.policy.act(obs)
        self.seconds += time.perf_counter() - start
        self.steps += 1
        return action

    def reset(self) -> None:
        """Start of an episode."""
        self.policy.reset()

    def stats(self) -> dict[str, Any]:
        """The wrapped policy's statistics."""
        return self.policy.stats()


def parse_rule(rule: str) -> float | None:
    """The success margin in points of "within:P", or None for "fastest"."""
    if rule == "fastest":
        return None
    name, _, value = rule.partition(":")
    try:
        points = float(value)
    except ValueError:
        points = math.nan
    if name != "within" or not points >= 0:
        raise ConfigError(f"sweep --rule: expected 'within:P' (P >= 0 success points) or 'fastest', got {rule!r}.")
    return points


def gate_settings(
    bundle_gate: Gate,
    taus: Iterable[float] = (),
    modes: Iterable[str] = (),
    alphas: Iterable[float] = (),
    draft: str | Path | None = None,
    features: str | Path | None = None,
    delta: float = 0.1,
    tolerance: float = 1.0,
    min_steps: int = 6,
    max_steps: int | None = None,
    layers: int | None = None,
) -> list[GateSetting]:
    """The bundle's gate, its threshold replaced by each of `taus`, and the gate certified for each mode and alpha.

    Calibrating needs the draft and its features folder; settings whose gate equals an earlier one are dropped.
    """
    from rsd.training.calibrate import calibrate

    settings = [GateSetting("bundle", bundle_gate, {"kind": "bundle"})]
    settings += [GateSetting(f"{bundle_gate.mode} tau={tau:g}", dataclasses.replace(bundle_gate, tau=float(tau)), {"kind": "tau"})
                 for tau in taus]
    pairs = [(mode, alpha) for mode in modes for alpha in alphas]
    if pairs and (draft is None or features is None):
        raise ConfigError("sweep --modes/--alphas: expected --draft and --features to calibrate with, got "
                          f"draft={draft}, features={features}.")
    for mode, alpha in pairs:
        report = calibrate(draft, features, None, alpha=alpha, delta=delta, tolerance=tolerance, mode=mode,
                           min_steps=min_steps, max_steps=max_steps if mode == "prefix" else None, layers=layers, plot=False)
        source = {"kind": "calibration", "alpha": alpha, "delta": delta, "tolerance": tolerance,
                  "upper_bound": report["risk"]["upper_bound"], "test_acceptance": report["test"]["coverage"],
                  "test_risk": report["test"]["risk"]}
        settings.append(GateSetting(f"{mode} alpha={alpha:g}", Gate(**report["gate"]), source))
    unique: list[GateSetting] = []
    for setting in settings:
        if all(setting.gate != kept.gate for kept in unique):
            unique.append(setting)
    return unique


def run_sweep(
    main: MainModel,
    bundle: str | Path,
    env: str,
    seeds: Sequence[int],
    settings: Sequence[GateSetting],
    rule: str = "within:5",
    engine: str = "auto",
    warmup: int = 3,
    env_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    replan_every: int | None = None,
) -> dict[str, Any]:
    """Main-only and one speculative policy per gate setting on the same `seeds`, interleaved; the frontier report.

    Every policy executes `replan_every` steps of each chunk before it replans (None: the whole chunk)."""
    if not seeds:
        raise ConfigError("sweep: expected at least one seed, got none.")
    if not settings:
        raise ConfigError("sweep: expected at least one gate setting, got none.")
    margin = parse_rule(rule)
    world = make_env(env, **(env_kwargs or {}))
    loaded = load_bundle_engines(bundle, main, engine=engine)
    policies: dict[str, MainOnlyPolicy | SpeculativePolicy] = {BASELINE: MainOnlyPolicy(main, replan_every)}
    for setting in settings:  # the engines are stateless, so every speculative policy shares the bundle's
        engine_for_gate = SpeculativeEngine(main, loaded.draft, loaded.decoders, loaded.exit_layer, setting.gate)
        policies[setting.name] = SpeculativePolicy(main, engine_for_gate, replan_every)
    first = world.reset(seeds[0])
    for policy in policies.values():  # warm-up chunks (lazy initialisation, caches): excluded from every figure
        for _ in range(warmup):
            policy.predict_chunk(first)
    timed = {name: TimedPolicy(policy) for name, policy in policies.items()}
    before = {name: policy.stats() for name, policy in policies.items()}
    episodes: dict[str, list[EpisodeResult]] = {name: [] for name in policies}
    for index, seed in enumerate(seeds):
        for name, policy in timed.items():
            episodes[name] += evaluate(policy, world, [seed], progress=False).episodes
        if progress:
            rates = ", ".join(f"{name} {np.mean([e.success for e in eps]):.2f}" for name, eps in episodes.items())
            print(f"sweep seed {seed} ({index + 1}/{len(seeds)}): success {rates}", flush=True)
    reports = {name: _eval_report(name, episodes[name], before[name], policy.stats(), name == BASELINE)
               for name, policy in policies.items()}
    gates = {s.name: s for s in settings}
    rows = [_row(name, reports[name], timed[name], gates.get(name)) for name in policies]
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["ms_per_step"] / base["ms_per_step"]
    chosen = _pick(rows, margin)
    report = {
        "hardware": hardware_card(next(main.vla.parameters()).device, next(main.vla.parameters()).dtype),
        "env": env,
        "bundle": str(bundle),
        "engine": loaded.engine,
        "exit_layer": loaded.exit_layer,
        "seeds": [int(s) for s in seeds],
        "replan_every": replan_every,
        "warmup_chunks_excluded": warmup,
        "rule": rule,
        "rows": rows,
        "chosen": chosen,
        "comparison": format_comparison({"baseline": reports[BASELINE], "speculative": reports[chosen]}) if chosen != BASELINE else "",
        "eval": {name: r.to_json() for name, r in reports.items()},
    }
    report["markdown"] = format_sweep(report)
    return report


def _eval_report(name: str, episodes: list[EpisodeResult], before: dict[str, Any], after: dict[str, Any], baseline: bool) -> EvalReport:
    """One policy's episodes as an `EvalReport`, with acceptance over the sweep's calls only."""
    calls = after["calls"] - before["calls"]
    acceptance = None if baseline or not calls else (after["accepted"] - before["accepted"]) / calls
    total = after["stages"].get("total", {})
    latency = {"p50": float(total["p50"]), "mean": float(total["mean"])} if total.get("n") else None
    return EvalReport(episodes, acceptance, latency, name)


def _row(name: str, report: EvalReport, timed: TimedPolicy, setting: GateSetting | None) -> dict[str, Any]:
    """One table row: success with its interval, acceptance, accepted steps, compute per control step."""
    stats = timed.stats()
    successes = report.successes
    low, high = wilson_interval(successes, len(report.episodes))
    accepted = stats["accepted"]
    return {
        "name": name,
        "gate": None if setting is None else setting.gate.to_json(),
        "source": None if setting is None else setting.source,
        "episodes": len(report.episodes),
        "successes": successes,
        "success_rate": report.success_rate,
        "success_ci95": [low, high],
        "mean_length": report.mean_length,
        "acceptance": report.acceptance_rate,
        "mean_accepted_steps": stats["mean_accepted_steps"] if setting is not None and accepted else None,
        "steps": timed.steps,
        "ms_per_step": 1e3 * timed.seconds / timed.steps,
    }


def _pick(rows: list[dict[str, Any]], margin: float | None) -> str:
    """The operating point: the fastest speculative row meeting the rule (main-only when none does)."""
    base = rows[0]
    candidates = [r for r in rows[1:] if margin is None or r["success_rate"] >= base["success_rate"] - margin / 100 - 1e-12]
    return min(candidates, key=lambda r: r["ms_per_step"])["name"] if candidates else base["name"]


def _executed_text(replan_every: int | None) -> str:
    """How much of each chunk the sweep's policies execute, for the table's caption."""
    return "whole chunks executed" if replan_every is None else f"the first {replan_every} steps of each chunk executed"


def format_sweep(report: dict[str, Any]) -> str:
    """The frontier as a markdown table, the rule and its operating point."""
    card = report["hardware"]
    lines = [f"Sweep on `{report['env']}`, {len(report['seeds'])} seeds ({report['seeds'][0]}..{report['seeds'][-1]}), interleaved "
             f"per seed; bundle engine {report['engine']}, exit layer {report['exit_layer']}; {card['device']} {card['dtype']}, "
             f"{card['cpu_threads']} torch threads; {report['warmup_chunks_excluded']} warm-up chunks per policy excluded; "
             f"{_executed_text(report.get('replan_every'))}.", "",
             "| policy | gate | success | 95 % CI | acceptance | steps / accepted chunk | ms / control step | time vs main-only |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        gate = row["gate"]
        read = "" if gate is None or gate.get("layers") is None else f" (coarsest {gate['layers']})"
        gate_text = "-" if gate is None else f"{gate['mode']}, {gate['statistic']}{read} >= {gate['tau']:.4f}{gate_steps_text(gate)}"
        acceptance = "-" if row["acceptance"] is None else f"{row['acceptance']:.3f}"
        steps = "-" if row["mean_accepted_steps"] is None else f"{row['mean_accepted_steps']:.2f}"
        low, high = row["success_ci95"]
        mark = " **(chosen)**" if row["name"] == report["chosen"] else ""
        lines.append(f"| {row['name']}{mark} | {gate_text} | {row['successes']}/{row['episodes']} ({100 * row['success_rate']:.1f} %) | "
                     f"{100 * low:.1f}–{100 * high:.1f} % | {acceptance} | {steps} | {row['ms_per_step']:.2f} | {row['time_ratio']:.3f} |")
    lines += ["", f"Rule `{report['rule']}`: operating point **{report['chosen']}**."]
    if report["comparison"]:
        lines.append(report["comparison"])
    return "\n".join(lines) + "\n"


def plot_sweep(report: dict[str, Any], path: str | Path) -> None:
    """Success (with 95 % Wilson intervals) against speed-up over main-only, main-only and the operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for index, row in enumerate(report["rows"]):
        speedup = 1.0 / row["time_ratio"]
        low, high = row["success_ci95"]
        error = [[row["success_rate"] - low], [high - row["success_rate"]]]
        style = "ks" if row["name"] == BASELINE else ("r*" if row["name"] == report["chosen"] else "bo")
        ax.errorbar([speedup], [row["success_rate"]], yerr=error, fmt=style, capsize=3, markersize=9 if style == "r*" else 6)
        ax.annotate(row["name"], (speedup, row["success_rate"]), textcoords="offset points", xytext=(5, 4 + 11 * (index % 4)), fontsize=7)  # staggered: rows often tie
    ax.axvline(1.0, color="k", linestyle=":", linewidth=0.8)
    ax.set_xlabel("speed-up over main-only (compute per control step)")
    ax.set_ylabel(f"success rate ({len(report['seeds'])} seeds, 95 % Wilson)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{report['env']}: rule {report['rule']} picks {report['chosen']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep_json_line(report: dict[str, Any]) -> str:
    """The one-line JSON summary printed last."""
    rows = {r["name"]: {"success": round(r["success_rate"], 4), "acceptance": r["acceptance"], "time_ratio": round(r["time_ratio"], 4)}
            for r in report["rows"]}
    return json.dumps({"env": report["env"], "episodes": len(report["seeds"]), "rule": report["rule"], "chosen": report["chosen"], "rows": rows})


def run_sweep_command(
    policy: str | Path | MainModel,
    bundle: str | Path,
    env: str,
    episodes: int,
    seed: int = 10_000,
    taus: Iterable[float] = (),
    modes: Iterable[str] = (),
    alphas: Iterable[float] = (),
    draft: str | Path | None = None,
    features: str | Path | None = None,
    delta: float = 0.1,
    tolerance: float = 1.0,
    min_steps: int = 6,
    max_steps: int | None = None,
    layers: int | None = None,
    rule: str = "within:5",
    engine: str = "auto",
    device: str | None = None,
    warmup: int = 3,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    env_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    replan_every: int | None = None,
) -> dict[str, Any]:
    """The whole `rsd sweep`: load the main model, build the gate settings, sweep, write JSON and the plot."""
    if episodes < 1:
        raise ConfigError(f"sweep --episodes: expected an int >= 1, got {episodes}.")
    parse_rule(rule)
    main = policy if isinstance(policy, MainModel) else load_main(policy, device, None)
    bundle_gate = Gate.from_json(read_manifest(bundle), f"{bundle}/manifest.json")
    settings = gate_settings(bundle_gate, taus, modes, alphas, draft, features, delta, tolerance, min_steps, max_steps, layers)
    report = run_sweep(main, bundle, env, list(range(seed, seed + episodes)), settings, rule, engine, warmup, env_kwargs, progress,
                       replan_every)
    if json_path:
        Path(json_path).write_text(json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=2, allow_nan=True) + "\n")
    if plot_path:
        plot_sweep(report, plot_path)
    return report
