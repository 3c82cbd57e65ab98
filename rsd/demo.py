"""rsd demo: the whole pipeline on the CPU with built-in data, ending in `report.md`.

generate demonstrations (tabletop world) → train the RFSQ tokenizer → train the tiny policy → collect
exit-layer features → train the draft → calibrate tau → export ONNX + TorchScript engines → bench-latency
→ closed-loop evaluation of SpeculativePolicy against MainOnlyPolicy on the same seeds → report.

Usage:
    rsd demo                      # about 7 minutes on 2 cores
    rsd demo --quick --out runs/quick    # under a minute, smaller everything (used by the tests)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsd.config import to_dict
from rsd.io import staged_dir
from rsd.presets import get_preset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of every demo step."""

    episodes: int = 200  # demonstrations generated
    tokenizer_epochs: int = 30  # tokenizer training epochs
    policy_epochs: int = 12  # policy training epochs
    draft_epochs: int = 40  # draft training epochs
    extra_exit_layers: tuple[int, ...] = (2, 4)  # other exit layers whose drafts are reported
    eval_episodes: int = 50  # closed-loop episodes per policy
    bench_iters: int = 50  # timed iterations per stage
    bench_warmup: int = 10  # untimed warm-up iterations per stage
    seed: int = 0  # seeds everything


EXPLORE_COVERAGE = 0.5  # coverage of the extra, uncalibrated speculative evaluation (shows what acceptance costs)

QUICK = DemoConfig(episodes=40, tokenizer_epochs=15, policy_epochs=3, draft_epochs=8, extra_exit_layers=(), eval_episodes=4,
                   bench_iters=10, bench_warmup=3)


def _step(name: str, timings: dict[str, float]) -> Any:
    """Print and time one pipeline step (a context manager)."""
    from contextlib import contextmanager

    @contextmanager
    def timed() -> Any:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - start
        print(f"=== {name}: {timings[name]:.1f} s ===", flush=True)

    return timed()


def run_demo(out: str | Path = "runs/demo", quick: bool = False, preset: str = "tiny", overwrite: bool = False) -> dict[str, Any]:
    """Run every step into `out` and write `out/report.md` and `out/report.json`; return the report.

    Everything is written into a staging folder beside `out` and moved there at the end (`rsd.io.staged_dir`): an
    interrupted demo leaves no half-made folder, and an earlier demo at `out` (replaced only with `overwrite=True`)
    stays intact until the new one is complete.
    """
    out = Path(out)
    with staged_dir(out, "demo", overwrite) as stage:
        report = _run_steps(stage, quick, preset)
        report = _moved(report, str(stage), str(out))
        (stage / "report.json").write_text(json.dumps(report, indent=2, default=str, allow_nan=True) + "\n")
        (stage / "report.md").write_text(format_demo_report(report))
    print(f"\nreport: {out / 'report.md'}")
    return report


def _moved(value: Any, old: str, new: str) -> Any:
    """`value` with every string path under `old` (the staging folder) rewritten under `new` (where it ends up)."""
    if isinstance(value, dict):
        return {k: _moved(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved(v, old, new) for v in value]
    return new + value[len(old):] if isinstance(value, str) and value.startswith(old) else value


def _run_steps(out: Path, quick: bool, preset: str) -> dict[str, Any]:
    """Every step of the demo, writing into the folder `out`; return the report (without writing it)."""
    from rsd.bench.latency import run_bench_latency
    from rsd.data.hdf5 import read_demos
    from rsd.envs.demos import generate_demos
    from rsd.envs.evaluate import compare_policies
    from rsd.export import export_draft
    from rsd.runtime.policy import load_main
    from rsd.training.calibrate import calibrate
    from rsd.training.draft import train_draft
    from rsd.training.features import collect_features
    from rsd.training.policy import train_policy
    from rsd.training.tokenizer import train_tokenizer

    config = QUICK if quick else DemoConfig()
    spec = get_preset(preset)
    timings: dict[str, float] = {}
    report: dict[str, Any] = {"config": to_dict(config), "preset": preset, "quick": quick}
    data = out / "demos.hdf5"
    k = spec.model.default_exit_layer

    with _step("generate demonstrations", timings):
        report["demos"] = generate_demos("tabletop", episodes=config.episodes, out=data, seed=config.seed, task_family="any")
    with _step("train tokenizer", timings):
        episodes = read_demos(data)
        tok_train = dataclasses.replace(spec.tokenizer_train, epochs=config.tokenizer_epochs, seed=config.seed)
        report["tokenizer"] = train_tokenizer([e.actions for e in episodes], spec.tokenizer, tok_train, out / "tokenizer",
                                              episode_ids=[e.episode_id for e in episodes])
    with _step("train policy", timings):
        pol_train = dataclasses.replace(spec.policy_train, epochs=config.policy_epochs, seed=config.seed)
        report["policy"] = train_policy(data, out / "tokenizer", out / "policy", preset, pol_train)
    drafts: dict[int, dict[str, Any]] = {}
    for layer in (k, *config.extra_exit_layers):
        with _step(f"features, draft and calibration at exit layer {layer}", timings):
            features = out / f"features_k{layer}"
            collect_features(out / "policy", data, layer, features)
            draft_train = dataclasses.replace(spec.draft_train, epochs=config.draft_epochs, seed=config.seed)
            trained = train_draft(features, out / f"draft_k{layer}", preset, draft_train)
            calibration = calibrate(out / f"draft_k{layer}", features, out / f"draft_k{layer}" / "calibration.json")
            drafts[layer] = {"draft": trained["best"], "parameters": trained["parameters"], "calibration": _calibration_summary(calibration),
                             "calibration_curve": calibration["calibration"]["curve"]}
    report["drafts"] = drafts
    with _step("export bundle (onnx, torchscript)", timings):
        report["export"] = export_draft(out / f"draft_k{k}", out / "tokenizer", out / "bundle", formats=("onnx", "torchscript"),
                                        calibration=out / f"draft_k{k}" / "calibration.json", features=out / f"features_k{k}")
    with _step("bench-latency", timings):
        bench = run_bench_latency(bundle=out / "bundle", main=out / "policy", device="cpu", iters=config.bench_iters,
                                  exit_layers=sorted({k, *config.extra_exit_layers}),
                                  warmup=config.bench_warmup, observations=data, replay=32, json_path=out / "bench.json",
                                  plot_path=out / "bench.png", markdown_path=out / "bench.md")
        report["bench"] = {k2: bench[k2] for k2 in ("baseline_p50", "acceptance", "speedup", "replay")}
        report["bench_markdown"] = bench["markdown"]
    with _step("closed-loop evaluation", timings):
        seeds = list(range(10_000 + config.seed, 10_000 + config.seed + config.eval_episodes))
        taus: dict[str, float | None] = {"speculative": None}
        explore_tau = tau_at_coverage(drafts[k]["calibration_curve"], EXPLORE_COVERAGE)
        if explore_tau != drafts[k]["calibration"]["tau"]:
            taus[f"speculative, tau {explore_tau:.3f} (coverage {EXPLORE_COVERAGE:.0%}, above the risk target)"] = explore_tau
        reports = compare_policies(load_main(out / "policy", "cpu", None), "tabletop", seeds, bundle=out / "bundle", taus=taus)
        report["eval"] = {name: r.to_json() for name, r in reports.items()}
        report["eval_markdown"] = {name: r.to_markdown() for name, r in reports.items()}
    report["timings_s"] = timings
    return report


def tau_at_coverage(curve: list[dict[str, Any]], coverage: float) -> float:
    """The threshold of a calibration curve whose coverage is closest to `coverage` (for an exploratory run)."""
    finite = [p for p in curve if math.isfinite(p["tau"])]
    return min(finite, key=lambda p: abs(p["coverage"] - coverage))["tau"]


def _calibration_summary(calibration: dict[str, Any]) -> dict[str, Any]:
    """The figures of a calibration worth reporting."""
    return {
        "tau": calibration["tau"],
        "gate_statistic": calibration["gate_statistic"],
        "calibration_coverage": calibration["calibration"]["coverage"],
        "test_coverage": calibration["test"]["coverage"],
        "test_risk": calibration["test"]["risk"],
        "test_agreement": calibration["test"]["agreement"],
        "token_agreement_all": calibration["token_agreement_all"],
    }


def format_demo_report(report: dict[str, Any]) -> str:
    """The demo's markdown report: times, tokenizer error, draft agreement, acceptance, speed-up, success."""
    lines = ["# rsd demo report", "", f"Preset `{report['preset']}`{' (quick)' if report['quick'] else ''}.", "", "## Time per step", "",
             "| step | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in report["timings_s"].items()]
    lines.append(f"| total | {sum(report['timings_s'].values()):.1f} |")
    tok = report["tokenizer"]
    lines += ["", "## Tokenizer: validation MSE (normalised) by layers used", "", "| layers c | val MSE |", "|---|---|"]
    lines += [f"| {c} | {mse:.2e} |" for c, mse in _mse_by_layers(tok)]
    pol = report["policy"]["best"]
    lines += ["", "## Policy (validation episodes)", "", f"- decoded-action L1 (normalised): {pol['val_action_l1']:.4f}",
              "- token accuracy per layer: " + ", ".join(f"{a:.3f}" for a in pol["val_layer_accuracy"]),
              f"- training time: {report['policy']['seconds']:.1f} s"]
    lines += ["", "## Drafts by exit layer", "",
              "| exit layer | params | val token agreement | val chunk agreement | tau | statistic | test acceptance | test risk |",
              "|---|---|---|---|---|---|---|---|"]
    for layer, entry in report["drafts"].items():
        d, c = entry["draft"], entry["calibration"]
        lines.append(f"| {layer} | {entry['parameters']:,} | {d['val_agreement']:.3f} | {d['val_chunk_agreement']:.3f} | {c['tau']:.4f} | "
                     f"{c['gate_statistic']} | {c['test_coverage']:.3f} | {c['test_risk']:.3f} |")
    lines += ["", "## Latency (CPU)", "", report["bench_markdown"]]
    ev = report["eval"]
    lines += ["", "## Closed-loop evaluation (same seeds)", "",
              "The calibrated speculative policy uses the bundle's tau; the third row, when present, gates at the tau whose "
              f"calibration coverage is {EXPLORE_COVERAGE:.0%}, above the risk target, to show what accepting drafts costs.", "",
              "| policy | success | mean length | acceptance | chunk p50 ms |", "|---|---|---|---|---|"]
    for name, e in ev.items():
        acc = e.get("acceptance_rate")
        latency = e.get("latency_ms") or {}
        lines.append(f"| {name} | {e['success_rate']:.3f} | {e['mean_length']:.1f} | "
                     f"{'-' if acc is None or (isinstance(acc, float) and math.isnan(acc)) else f'{acc:.3f}'} | "
                     f"{latency.get('p50', math.nan):.2f} |")
    for name, md in report["eval_markdown"].items():
        lines += ["", f"### {name}", "", md]
    return "\n".join(lines) + "\n"


def _mse_by_layers(tokenizer_report: dict[str, Any]) -> list[tuple[int, float]]:
    """(c, val MSE) pairs from the tokenizer's report."""
    values = tokenizer_report["val_mse_by_layers"]
    if isinstance(values, dict):
        return sorted((int(c), float(v)) for c, v in values.items())
    return [(c + 1, float(v)) for c, v in enumerate(values)]


__all__ = ["DemoConfig", "QUICK", "run_demo"]
