"""bench-ar: OpenVLA's autoregressive action mode, plain against speculative decoding, closed loop on the same seeds.

For every seed the plain AR policy and the speculative one (one per draft) each run one full episode in the
tabletop world, in an order that rotates per seed (interleaved A/B); the first seed is a labelled, untimed warm-up.
Reported per variant: per-seed outcomes (success, length) and whether every executed action equals plain
decoding's, the per-step latency (prefix = vision + prompt embedding, decode = the 7 action tokens, total) and the
ratio against plain decoding, tokens per target pass and acceptance by draft position.

Usage:
    rsd bench-ar --policy runs/ar/policy --draft runs/ar/draft --episodes 20 --json runs/ar/bench.json
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd.bench.timing import hardware_card
from rsd.envs.evaluate import evaluate
from rsd.errors import ConfigError
from rsd.models.ar_actions import ARActionModel
from rsd.models.layer_draft import LayerDraft
from rsd.runtime.ar_policy import ARActionPolicy

log = logging.getLogger(__name__)


class _ActionLog:
    """A policy wrapper that hashes the actions of each episode, so trajectories can be compared exactly."""

    def __init__(self, policy: ARActionPolicy) -> None:
        self.policy = policy
        self.digests: list[str] = []
        self._digest = hashlib.sha256()

    def reset(self) -> None:
        """Close the previous episode's digest and start a new one."""
        self.policy.reset()
        self._digest = hashlib.sha256()
        self.digests.append("")

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """The wrapped policy's action, added to the episode digest."""
        action = self.policy.act(obs)
        self._digest.update(np.ascontiguousarray(action, dtype=np.float32).tobytes())
        self.digests[-1] = self._digest.hexdigest()
        return action

    def stats(self) -> dict[str, Any]:
        """The wrapped policy's statistics."""
        return self.policy.stats()


def run_bench_ar(policy_dir: str | Path, draft_dirs: Sequence[str | Path], episodes: int = 20, first_seed: int = 10_000,
                 gamma: int = 3, env: str = "tabletop", json_path: str | Path | None = None, max_steps: int | None = None) -> dict[str, Any]:
    """Closed-loop plain vs speculative AR decoding on `episodes` seeds (plus one warm-up seed); return the report.

    `max_steps` shortens the episodes (the environment's own limit otherwise).
    """
    env_kwargs = {} if max_steps is None else {"max_steps": max_steps}
    if episodes < 1 or not draft_dirs:
        raise ConfigError(f"bench-ar: expected episodes >= 1 and at least one draft, got {episodes} and {list(draft_dirs)}.")
    model = ARActionModel.load(policy_dir)
    target = model.vla.language_model
    policies = {"plain": ARActionPolicy(model)}
    for directory in draft_dirs:
        policies[Path(directory).name] = ARActionPolicy(model, LayerDraft.load(directory, target, model.fingerprint), gamma=gamma)
    names = list(policies)
    warm = first_seed - 1
    for policy in policies.values():  # warm-up, excluded
        evaluate(policy, env, [warm], progress=False, env_kwargs=env_kwargs)
        policy.clear_stats()
    logged = {name: _ActionLog(policy) for name, policy in policies.items()}
    outcomes: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for index, seed in enumerate(range(first_seed, first_seed + episodes)):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            episode = evaluate(logged[name], env, [seed], progress=False, env_kwargs=env_kwargs).episodes[0]
            outcomes[name].append({"seed": seed, "success": episode.success, "length": episode.length, "actions": logged[name].digests[-1]})
        log.info("bench-ar seed %d: %s", seed, {n: outcomes[n][-1]["success"] for n in names})
    report = _report(model, policies, outcomes, gamma, episodes)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _report(model: ARActionModel, policies: dict[str, ARActionPolicy], outcomes: dict[str, list[dict[str, Any]]], gamma: int,
            episodes: int) -> dict[str, Any]:
    plain_stats = policies["plain"].stats()
    plain_total = plain_stats["stages"]["total"]["mean"]
    plain_decode = plain_stats["stages"]["decode"]["mean"]
    plain_outcomes = outcomes["plain"]
    rows = {}
    for name, policy in policies.items():
        stats = policy.stats()
        stages = stats["stages"]
        rows[name] = {
            "success_rate": float(np.mean([o["success"] for o in outcomes[name]])),
            "same_outcomes_as_plain": sum((o["success"], o["length"]) == (p["success"], p["length"]) for o, p in zip(outcomes[name], plain_outcomes, strict=True)),
            "same_actions_as_plain": sum(o["actions"] == p["actions"] for o, p in zip(outcomes[name], plain_outcomes, strict=True)),
            "steps": stats["calls"],
            "prefix_ms": stages["prefix"]["mean"], "decode_ms": stages["decode"]["mean"], "total_ms": stages["total"]["mean"],
            "decode_speedup": plain_decode / stages["decode"]["mean"], "step_speedup": plain_total / stages["total"]["mean"],
            "tokens_per_target_pass": stats["decoding"]["tokens_per_target_pass"],
            "acceptance_rate": stats["acceptance_rate"], "acceptance_by_position": stats["decoding"]["acceptance_by_position"],
            "layers": None if policy.decoder is None else list(policy.decoder.draft.draft.config.layers),
        }
    vla = model.vla.config.llm
    report = {"hardware": hardware_card(torch.device("cpu"), torch.float32), "episodes": episodes, "gamma": gamma,
              "model": {"layers": vla.num_layers, "hidden": vla.hidden_size, "fingerprint": model.fingerprint},
              "warmup": "one extra seed per policy before the timed run, excluded", "variants": rows,
              "outcomes": {name: [{k: o[k] for k in ("seed", "success", "length")} for o in rows_] for name, rows_ in outcomes.items()}}
    report["markdown"] = format_ar_report(report)
    return report


def format_ar_report(report: dict[str, Any]) -> str:
    """Markdown: the hardware card and one row per variant."""
    card = report["hardware"]
    n = report["episodes"]
    lines = [f"bench-ar on {card['cpu']} ({card['cpu_threads']} torch threads), {card['date']}; {report['model']['layers']}-layer AR VLA, "
             f"{n} tabletop seeds per variant, greedy, gamma {report['gamma']}; warm-up seed excluded.", "",
             "| variant | layers | success | same outcome as plain | same actions as plain | tokens / target pass | acceptance by position | "
             "decode ms | step ms | decode ratio | step ratio |", "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for name, row in report["variants"].items():
        by_position = "-" if row["layers"] is None else " / ".join(f"{100 * a:.0f}%" for a in row["acceptance_by_position"])
        layers = "all" if row["layers"] is None else ",".join(map(str, row["layers"]))
        lines.append(f"| {name} | {layers} | {100 * row['success_rate']:.0f} % | {row['same_outcomes_as_plain']}/{n} | {row['same_actions_as_plain']}/{n} | "
                     f"{row['tokens_per_target_pass']:.2f} | {by_position} | {row['decode_ms']:.1f} | {row['total_ms']:.1f} | "
                     f"{row['decode_speedup']:.2f}x | {row['step_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def json_line(report: dict[str, Any]) -> str:
    """The one-line JSON summary printed last."""
    keys = ("step_speedup", "decode_speedup", "same_actions_as_plain")
    return json.dumps({"bench": "ar", **{name: {k: row[k] for k in keys} for name, row in report["variants"].items()}})
