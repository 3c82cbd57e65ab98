"""rsd demo: the whole pipeline on the CPU with built-in data, ending in `report.md`.

generate demonstrations (tabletop world, DART noise) → train the RFSQ tokenizer → train the tiny policy → DAgger:
recovery demonstrations from that policy's own states, and the policy trained on from its weights over the
aggregated data → collect exit-layer features → train the draft → calibrate the gate (Learn-then-Test) → export
ONNX + TorchScript engines → bench-latency → the success–latency sweep: MainOnlyPolicy and SpeculativePolicy at
the bundle's gate and at gates calibrated for other modes and risk levels, on the same held-out seeds, each policy
executing the first `replan_every` steps of a chunk (`rsd.bench.frontier`) → report.

The policy learns where the named block is from the object state the demonstrations record (`obs/object`, the
tiny preset's `object_loss`), which halved the training steps a given success needs.

Usage:
    rsd demo                      # 9-16 minutes on 2 cores (by the machine's pace), most of it the policy's 4,450 training steps
    rsd demo --seed 1             # another run: other demonstrations, recovery episodes, initialisation and batches
    rsd demo --quick --out runs/quick    # about 80 s, smaller everything (used by the tests)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsd.config import to_dict
from rsd.device import cpu_compiler
from rsd.errors import ConfigError
from rsd.io import staged_dir
from rsd.presets import get_preset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of every demo step."""

    episodes: int = 1000  # expert demonstrations generated
    noise: float = 0.1  # DART: std of the noise added to the executed (not the recorded) xyz actions
    tokenizer_epochs: int = 4  # tokenizer training epochs (1,000 episodes: plenty of chunks per epoch)
    policy_epochs: int = 1  # policy training epochs on the expert demonstrations
    batch_size: int = 32  # policy training batch (both phases); 2 + 2 epochs at 16 (as many steps, half the frames) failed
    recovery_episodes: int = 700  # DAgger: episodes the policy starts (1..handover steps) and the expert finishes, recorded
    handover: int = 40  # most policy steps before the expert takes over
    recovery_epochs: int = 3  # epochs on the aggregated data, from the first policy's weights (0 with no recovery episodes)
    aggregate_demos: int | None = 700  # demonstrations kept beside the recovery episodes (None: all of them)
    compile: bool = True  # torch.compile the policy's decoder layers for training where inductor can build kernels (1.1x a step on 2 cores)
    warmup: float = 0.2  # share of each training phase's steps that warm the learning rate up (one-cycle schedule)
    draft_episodes: int = 300  # fresh expert episodes whose features train, calibrate and test the drafts
    replan_every: int = 4  # steps of each chunk executed before replanning, in selection rollouts, DAgger and the sweep
    rollout_episodes: int = 50  # selection rollouts per evaluated epoch
    rollout_batch: int = 50  # DAgger's and the selection's episodes played side by side, their chunks predicted in one batch
    draft_epochs: int = 15  # draft training epochs
    extra_exit_layers: tuple[int, ...] = ()  # other exit layers whose drafts are reported (each costs about 1.5 min)
    gate_mode: str = "prefix"  # the bundle's gate: "prefix" (confident leading steps) or "chunk"
    min_steps: int = 6  # prefix gate: fewest leading steps worth accepting
    alpha: float = 0.2  # the bundle's certified risk level
    sweep_alphas: tuple[float, ...] = (0.3,)  # risk levels of the sweep's gates, in each of sweep_modes
    sweep_modes: tuple[str, ...] = ("chunk",)  # gate modes certified at each sweep alpha (the bundle's own gate is always swept)
    rule: str = "within:5"  # the sweep's operating-point rule
    eval_episodes: int = 100  # closed-loop episodes per policy (held-out seeds 10000..)
    bench_iters: int = 50  # timed iterations per stage
    bench_warmup: int = 10  # untimed warm-up iterations per stage
    seed: int = 0  # seeds training; run s draws its episodes' layouts from seed 100,000 s on (evaluation: always 10000..)


QUICK = DemoConfig(episodes=40, tokenizer_epochs=15, policy_epochs=2, recovery_episodes=10, handover=10, recovery_epochs=1, aggregate_demos=30,
                   draft_episodes=20, rollout_episodes=2, draft_epochs=8, sweep_alphas=(0.3,), eval_episodes=4,
                   bench_iters=10, bench_warmup=3, compile=False)
RECIPES = {"full": DemoConfig(), "quick": QUICK}


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


def run_demo(out: str | Path = "runs/demo", quick: bool = False, preset: str = "tiny", overwrite: bool = False, seed: int | None = None) -> dict[str, Any]:
    """Run every step into `out` and write `out/report.md` and `out/report.json`; return the report.

    `quick` runs the smoke-test sizes (`QUICK`), else the full recipe; `seed` replaces the recipe's (`DemoConfig.seed`).

    Everything is written into a staging folder beside `out` and moved there at the end (`rsd.io.staged_dir`): an
    interrupted demo leaves no half-made folder, and an earlier demo at `out` (replaced only with `overwrite=True`)
    stays intact until the new one is complete.
    """
    if seed is not None and (not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"rsd demo --seed: expected an int >= 0, got {seed!r}.")
    out = Path(out)
    with staged_dir(out, "demo", overwrite) as stage:
        report = _run_steps(stage, "quick" if quick else "full", preset, seed)
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


def _run_steps(out: Path, recipe: str, preset: str, seed: int | None = None) -> dict[str, Any]:
    """Every step of the demo, writing into the folder `out`; return the report (without writing it)."""
    from rsd.bench.frontier import BASELINE, gate_settings, plot_sweep, run_sweep
    from rsd.bench.latency import run_bench_latency
    from rsd.data.hdf5 import read_demos
    from rsd.envs.demos import generate_demos
    from rsd.export import export_draft
    from rsd.runtime.gate import Gate
    from rsd.runtime.policy import load_main
    from rsd.training.calibrate import calibrate
    from rsd.training.draft import train_draft
    from rsd.training.features import collect_features
    from rsd.training.policy import train_policy
    from rsd.training.tokenizer import train_tokenizer

    config = RECIPES[recipe] if seed is None else dataclasses.replace(RECIPES[recipe], seed=seed)
    base = 100_000 * config.seed  # first layout seed of this run's demonstrations (recovery: + 20,000, drafts: + 30,000)
    spec = get_preset(preset)
    timings: dict[str, float] = {}
    report: dict[str, Any] = {"config": to_dict(config), "preset": preset, "recipe": recipe}
    data, draft_data = out / "demos.hdf5", out / "draft_demos.hdf5"
    k = spec.model.default_exit_layer

    with _step("generate demonstrations", timings):
        report["demos"] = generate_demos("tabletop", episodes=config.episodes, out=data, seed=base, task_family="any",
                                         noise=config.noise, progress=False)
        report["draft_demos"] = generate_demos("tabletop", episodes=config.draft_episodes, out=draft_data, seed=base + 30_000,
                                               task_family="any", noise=config.noise, progress=False)
    with _step("train tokenizer", timings):
        episodes = read_demos(data)
        tok_train = dataclasses.replace(spec.tokenizer_train, epochs=config.tokenizer_epochs, seed=config.seed)
        report["tokenizer"] = train_tokenizer([e.actions for e in episodes], spec.tokenizer, tok_train, out / "tokenizer",
                                              episode_ids=[e.episode_id for e in episodes])
    pol_train = dataclasses.replace(spec.policy_train, epochs=config.policy_epochs, batch_size=config.batch_size, seed=config.seed,
                                    warmup=config.warmup)
    options = dataclasses.replace(spec.policy_options, rollout_episodes=config.rollout_episodes, rollout_replan_every=config.replan_every,
                                  rollout_batch=config.rollout_batch, compile=config.compile and cpu_compiler() is not None)
    if config.compile and not options.compile:
        print("no C++ compiler ($CXX or g++) or no Python.h: the policy trains eagerly (about 1.1x slower a step than compiled)", flush=True)
    report["compiled_training"] = options.compile
    first = "policy_demos" if config.recovery_episodes else "policy"
    with _step("train policy", timings):  # no rollouts (a failing policy plays whole episodes): it only starts the recovery episodes
        first_options = dataclasses.replace(options, select_by="val_l1") if config.recovery_episodes else options
        report[first] = train_policy(data, out / "tokenizer", out / first, preset, pol_train, options=first_options)
    if config.recovery_episodes:
        with _step("DAgger: recovery demonstrations from the policy's states", timings):
            report["recovery"] = generate_demos("tabletop", episodes=config.recovery_episodes, out=out / "aggregate.hdf5",
                                                seed=base + 20_000, task_family="any", noise=config.noise, policy=out / first,
                                                handover=config.handover, aggregate=data, aggregate_episodes=config.aggregate_demos,
                                                replan_every=config.replan_every, batch=config.rollout_batch, progress=False)
        with _step("train policy on the aggregated data", timings):
            report["policy"] = train_policy(out / "aggregate.hdf5", out / "tokenizer", out / "policy", preset,
                                            dataclasses.replace(pol_train, epochs=config.recovery_epochs), options=options, init=out / first)
    drafts: dict[int, dict[str, Any]] = {}
    for layer in (k, *config.extra_exit_layers):
        with _step(f"features, draft and calibration at exit layer {layer}", timings):
            features = out / f"features_k{layer}"
            collect_features(out / "policy", draft_data, layer, features, progress=False)
            draft_train = dataclasses.replace(spec.draft_train, epochs=config.draft_epochs, seed=config.seed)
            trained = train_draft(features, out / f"draft_k{layer}", preset, draft_train)
            calibration = calibrate(out / f"draft_k{layer}", features, out / f"draft_k{layer}" / "calibration.json", alpha=config.alpha,
                                    mode=config.gate_mode, min_steps=config.min_steps)
            drafts[layer] = {"draft": trained["best"], "parameters": trained["parameters"], "calibration": _calibration_summary(calibration),
                             "calibration_curve": calibration["calibration"]["curve"]}
    report["drafts"] = drafts
    with _step("export bundle (onnx, torchscript)", timings):
        report["export"] = export_draft(out / f"draft_k{k}", out / "tokenizer", out / "bundle", formats=("onnx", "torchscript"),
                                        calibration=out / f"draft_k{k}" / "calibration.json", features=out / f"features_k{k}")
    with _step("bench-latency", timings):
        bench = run_bench_latency(bundle=out / "bundle", main=out / "policy", device="cpu", iters=config.bench_iters,
                                  exit_layers=sorted({k, *config.extra_exit_layers}),
                                  warmup=config.bench_warmup, observations=draft_data, replay=32, json_path=out / "bench.json",
                                  plot_path=out / "bench.png", markdown_path=out / "bench.md")
        report["bench"] = {k2: bench[k2] for k2 in ("baseline_p50", "acceptance", "speedup", "replay")}
        report["bench_markdown"] = bench["markdown"]
    with _step("closed-loop sweep (same seeds)", timings):
        seeds = list(range(10_000, 10_000 + config.eval_episodes))  # the same held-out layouts for every run
        bundle_gate = Gate(**drafts[k]["calibration"]["gate"])
        settings = gate_settings(bundle_gate, modes=config.sweep_modes, alphas=config.sweep_alphas, draft=out / f"draft_k{k}",
                                 features=out / f"features_k{k}", min_steps=config.min_steps)
        sweep = run_sweep(load_main(out / "policy", "cpu", None), out / "bundle", "tabletop", seeds, settings, rule=config.rule,
                          replan_every=config.replan_every)
        (out / "sweep.json").write_text(json.dumps({k2: v for k2, v in sweep.items() if k2 != "markdown"}, indent=2, allow_nan=True) + "\n")
        plot_sweep(sweep, out / "sweep.png")
        report["sweep"] = {**{k2: sweep[k2] for k2 in ("rows", "chosen", "rule", "comparison", "markdown")},
                           "per_task": sweep["eval"][BASELINE]["per_task"]}
        print(_main_success(report["sweep"]), flush=True)
    report["timings_s"] = timings
    return report


def _calibration_summary(calibration: dict[str, Any]) -> dict[str, Any]:
    """The figures of a calibration worth reporting."""
    return {
        "gate": calibration["gate"],
        "alpha": calibration["risk"]["alpha"],
        "upper_bound": calibration["risk"]["upper_bound"],
        "calibration_coverage": calibration["calibration"]["coverage"],
        "test_coverage": calibration["test"]["coverage"],
        "test_risk": calibration["test"]["risk"],
        "test_steps_per_accepted": calibration["test"]["steps_per_accepted"],
        "test_agreement": calibration["test"]["agreement"],
        "token_agreement_all": calibration["token_agreement_all"],
    }


def format_demo_report(report: dict[str, Any]) -> str:
    """The demo's markdown report: times, tokenizer error, draft agreement, acceptance, speed-up, success."""
    recipe = report["recipe"]
    lines = ["# rsd demo report", "", f"Preset `{report['preset']}`{'' if recipe == 'full' else f' ({recipe})'}.", "", "## Time per step", "",
             "| step | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in report["timings_s"].items()]
    lines.append(f"| total | {sum(report['timings_s'].values()):.1f} |")
    tok = report["tokenizer"]
    lines += ["", "## Tokenizer: validation MSE (normalised) by layers used", "", "| layers c | val MSE |", "|---|---|"]
    lines += [f"| {c} | {mse:.2e} |" for c, mse in _mse_by_layers(tok)]
    pol = report["policy"]["best"]
    lines += ["", "## Policy (validation episodes)", "", f"- decoded-action L1 (normalised): {pol['val_action_l1']:.4f}",
              "- per dimension: " + ", ".join(f"{v:.3f}" for v in pol["val_action_l1_per_dim"]),
              "- token accuracy per layer: " + ", ".join(f"{a:.3f}" for a in pol["val_layer_accuracy"]),
              f"- training: {_pace(report['policy'])}" + (f" (before DAgger: {_pace(report['policy_demos'])})" if "policy_demos" in report else "")
              + ("; decoder layers compiled (torch.compile)" if report["compiled_training"] else "; eager")]
    if "recovery" in report:
        rec = report["recovery"]
        lines.append(f"- DAgger: {rec['episodes']} recovery episodes from the states of the policy trained on the demonstrations alone "
                     f"(epoch {report['policy_demos']['best']['epoch']}, validation L1 {report['policy_demos']['best']['val_action_l1']:.4f}; "
                     f"{rec['learner_done']} episode{'' if rec['learner_done'] == 1 else 's'} it ended alone, "
                     f"{rec['failed']} the expert failed), then {report['config']['recovery_epochs']} epochs on them and "
                     f"{_share(rec['aggregated'], report['demos']['episodes'])} demonstrations from its weights "
                     f"(selection rollouts {_rollouts(report['policy'])})")
    lines += ["", _main_success(report["sweep"])]
    lines += ["", "## Drafts by exit layer", "",
              "Each draft's gate is certified by Learn-then-Test on half of its held-out episodes (P(accepted and bad) <= alpha "
              "with probability 0.9; bad: an executed step misses the main model's by more than the main model's own error "
              "against the expert) and measured on the other half.", "",
              "| exit layer | params | val token agreement | val chunk agreement | gate | tau | alpha | certified bound | "
              "test acceptance | test risk | steps / accepted chunk |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for layer, entry in report["drafts"].items():
        d, c = entry["draft"], entry["calibration"]
        lines.append(f"| {layer} | {entry['parameters']:,} | {d['val_agreement']:.3f} | {d['val_chunk_agreement']:.3f} | "
                     f"{c['gate']['mode']} ({c['gate']['statistic']}) | {c['gate']['tau']:.4f} | {c['alpha']} | {c['upper_bound']:.4f} | "
                     f"{c['test_coverage']:.3f} | {c['test_risk']:.4f} | {c['test_steps_per_accepted']:.2f} |")
    lines += ["", "## Latency (CPU)", "", report["bench_markdown"]]
    lines += ["", "## Closed-loop sweep: success against compute per control step (same seeds)", "",
              "Main-only, the bundle's gate, and the gates certified for each mode at each of the sweep's risk levels, one episode per "
              "seed each, interleaved seed by seed; `sweep.png` plots success against speed-up.", "", report["sweep"]["markdown"]]
    return "\n".join(lines) + "\n"


def _pace(policy_report: dict[str, Any]) -> str:
    """Steps, seconds and milliseconds a step of one training run (with selection rollouts and validation): the
    figure that compares machines."""
    steps, seconds = policy_report["steps"], policy_report["seconds"]
    return f"{steps:,} steps in {seconds:.1f} s ({1000 * seconds / steps:.0f} ms a step)"


def _share(kept: int, generated: int) -> str:
    """How many of the demonstrations the aggregated data kept, e.g. "all 1,500" or "the first 700 of the 1,500"."""
    return f"all {generated:,}" if kept == generated else f"the first {kept:,} of the {generated:,}"


def _rollouts(policy_report: dict[str, Any]) -> str:
    """The selection rollouts' success per evaluated epoch, e.g. "0.10, 0.35 (epoch 2 kept)"."""
    rates = ", ".join(f"{m['rollout_success']:.2f}" for m in policy_report["history"] if "rollout_success" in m)
    return f"{rates} (epoch {policy_report['best']['epoch']} kept)"


def _main_success(sweep: dict[str, Any]) -> str:
    """Main-only success over the sweep's held-out seeds, overall and per task family, with 95 % Wilson intervals."""
    row = sweep["rows"][0]
    low, high = row["success_ci95"]
    text = f"**Main-only success: {row['successes']}/{row['episodes']} ({100 * row['success_rate']:.1f} %, 95 % CI {100 * low:.1f}–{100 * high:.1f} %)**"
    families = [f"{name} {t['successes']}/{t['episodes']} ({100 * t['wilson_95'][0]:.1f}–{100 * t['wilson_95'][1]:.1f} %)"
                for name, t in sorted(sweep["per_task"].items())]
    return text + (": " + ", ".join(families) if families else "") + "."


def _mse_by_layers(tokenizer_report: dict[str, Any]) -> list[tuple[int, float]]:
    """(c, val MSE) pairs from the tokenizer's report."""
    values = tokenizer_report["val_mse_by_layers"]
    if isinstance(values, dict):
        return sorted((int(c), float(v)) for c, v in values.items())
    return [(c + 1, float(v)) for c, v in enumerate(values)]


__all__ = ["DemoConfig", "QUICK", "run_demo"]
