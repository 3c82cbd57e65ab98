"""bench-latency: draft vs main timing, the speculative policy against the baseline, in one process.

Measured, each with warm-up iterations excluded (and labelled) under `torch.inference_mode`, CUDA
events on the GPU and wall time on the CPU: the vision stage, the main prefix(k) and suffix(k) for each
exit layer k, the full LLM pass, the RFSQ head, the draft and the decoders per engine, the baseline
(`MainOnlyEngine`, what `MainOnlyPolicy.predict_chunk` runs) and the speculative engine end to end on the
accept path (tau = 0) and the reject path (tau = inf). The expected speculative latency at acceptance p is
`p * T_accept + (1 - p) * T_reject` from those two measured paths; with a bundle, the speculative policy is
also run on replayed observations at the bundle's tau, giving the measured acceptance and latency.

Two ways to get a main model:
- `--bundle B --main M`: a trained policy folder and its exported bundle (all engines in the bundle).
- `--preset openvla-7b --random-weights`: the 7B-shaped model with random weights (latency does not
  depend on weight values), a random draft and decoder — how the 45-55 ms budget is checked on a GPU.

Output: a hardware card, a markdown table (stage, engine, mean/p50/p90/p99/max), the expected latency over
p, the speed-up at the measured (or given) acceptance, a plot, and one JSON line last.

Usage:
    rsd bench-latency --preset openvla-7b --random-weights --device cuda --dtype fp16 --exit-layers 8,16,24
    rsd bench-latency --bundle runs/demo/bundle --main runs/demo/policy --observations runs/demo/demos.hdf5
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd.config import get_preset
from rsd.data.stats import ActionStats, DatasetStatistics
from rsd.errors import ConfigError
from rsd.models.draft import DraftHead
from rsd.models.heads import RFSQHead
from rsd.models.policy import MainModel
from rsd.models.vla import PrismaticVLA, VLAInputs, resolve_device_dtype
from rsd.runtime.engines import DecoderEngine, DraftEngine, TorchDecoderEngine, TorchDraftEngine
from rsd.runtime.speculative import MainOnlyEngine, SpeculativeEngine
from rsd.runtime.timing import summarize

log = logging.getLogger(__name__)

ACCEPTANCE_GRID = [round(0.1 * i, 1) for i in range(11)]


def time_calls(fn: Callable[[], Any], iters: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of `iters` calls of `fn` after `warmup` untimed calls (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return times


def hardware_card(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What the numbers were measured on."""
    card: dict[str, Any] = {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if device.type == "cuda":
        card["gpu"] = torch.cuda.get_device_name(device)
        card["cuda"] = torch.version.cuda
    return card


RANDOM_PROMPT_TOKENS = 34  # Llama tokens of a typical LIBERO prompt ("In: What action should the robot take to ...?\nOut:")


@dataclass
class BenchSetup:
    """What one benchmark run times: the main model, inputs, and the draft/decoder engines by name."""

    main: MainModel
    inputs: VLAInputs
    drafts: dict[str, DraftEngine]  # engine name -> draft engine (the bundle's exit layer or any)
    decoders: dict[str, dict[int, DecoderEngine]]  # engine name -> {c: decoder engine}
    exit_layers: list[int]
    source: str
    bundle: Any = None  # rsd.export.loaders.LoadedBundle when benchmarking a bundle
    observations: list[dict[str, Any]] = field(default_factory=list)


def random_setup(preset: str, device: torch.device, dtype: torch.dtype, exit_layers: list[int], seed: int = 0) -> BenchSetup:
    """A main model, draft and decoder with random weights in the preset's exact shapes (latency only)."""
    spec = get_preset(preset)
    torch.manual_seed(seed)
    from rsd.tokenizer import ActionTokenizer

    vla = PrismaticVLA.random(spec.model, device=device, dtype=dtype, seed=seed)
    tok = spec.model.tokenizer
    head = RFSQHead(spec.model.llm.hidden_size, tok).to(device, dtype)
    bounds = np.stack([-np.ones(tok.action_dim), np.ones(tok.action_dim)])
    stats = DatasetStatistics(action=ActionStats.from_actions(bounds), proprio=ActionStats.from_actions(np.stack([-np.ones(max(spec.model.proprio_dim, 1)), np.ones(max(spec.model.proprio_dim, 1))])) if spec.model.proprio_dim else None)
    tokenizer = ActionTokenizer(tok, stats.action).to(device)
    main = MainModel(vla, head, tokenizer, stats, "random", fingerprint=f"random-weights:{preset}:seed{seed}").eval()
    draft = DraftHead(spec.draft(exit_layers[0])).to(device, dtype).eval()
    decoders = {c: TorchDecoderEngine(tokenizer.decoder_module(), c) for c in (tok.coarse_layers, tok.num_layers)}
    return BenchSetup(
        main=main,
        inputs=vla.random_inputs(batch=1, prompt_len=RANDOM_PROMPT_TOKENS, seed=seed),
        drafts={"torch": TorchDraftEngine(draft)},
        decoders={"torch": decoders},
        exit_layers=exit_layers,
        source=f"{preset} with random weights (latency only)",
    )


def example_inputs(main: MainModel, device: torch.device, instruction: str = "pick up the black bowl and place it on the plate") -> VLAInputs:
    """One observation's model inputs with a random image (and zero proprio) of the model's size."""
    config = main.vla.config
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(1, config.num_images, config.image_size, config.image_size, 3), dtype=np.uint8)
    proprio = np.zeros((1, config.proprio_dim), dtype=np.float32) if config.proprio_dim else None
    return main.prepare(images, [instruction], proprio).to(device)


def bundle_setup(bundle: str | Path, main_dir: str | Path, device: torch.device, dtype: torch.dtype, exit_layers: list[int] | None,
                 observations: str | Path | None, replay: int) -> BenchSetup:
    """A trained policy with every engine its bundle holds, and observations replayed from a demo file."""
    from rsd.export.loaders import available_engines, load_bundle_engines

    main = MainModel.load(main_dir, device=device, dtype=dtype)
    drafts: dict[str, DraftEngine] = {}
    decoders: dict[str, dict[int, DecoderEngine]] = {}
    loaded = None
    for name in available_engines(bundle, device):
        loaded = load_bundle_engines(bundle, main, engine=name, device=device)
        drafts[name], decoders[name] = loaded.draft, loaded.decoders
    if loaded is None:
        raise ConfigError(f"bench-latency: the bundle {bundle} has no engine that runs on {device}.")
    layers = sorted(set(exit_layers or []) | {loaded.exit_layer})
    obs = replay_observations(observations, replay) if observations else []
    return BenchSetup(main, example_inputs(main, device), drafts, decoders, layers, f"bundle {bundle} + policy {main_dir}", loaded, obs)


def replay_observations(path: str | Path, count: int) -> list[dict[str, Any]]:
    """Up to `count` observation dicts taken evenly from the frames of a demo file."""
    from rsd.data.hdf5 import read_demos

    frames = []
    for episode in read_demos(path):
        camera = sorted(episode.images)
        for t in range(len(episode.actions)):
            images = [episode.images[c][t] for c in camera]
            frames.append({
                "image": images[0] if len(images) == 1 else images,
                "instruction": episode.instruction,
                "proprio": None if episode.proprio is None else episode.proprio[t],
            })
    if not frames:
        raise ConfigError(f"bench-latency --observations: {path} holds no frames.")
    step = max(1, len(frames) // count)
    return frames[::step][:count]


@torch.inference_mode()
def bench_latency(setup: BenchSetup, iters: int = 50, warmup: int = 10, acceptance: float | None = None,
                  tau: float | None = None) -> dict[str, Any]:
    """Time every stage and both policies for `setup`; return the report (see `format_report`)."""
    main, inputs = setup.main, setup.inputs
    vla = main.vla
    device = next(vla.parameters()).device
    dtype = next(vla.parameters()).dtype
    rows: list[dict[str, Any]] = []

    def record(stage: str, engine: str, fn: Callable[[], Any], k: int | None = None) -> dict[str, float]:
        stats = summarize(time_calls(fn, iters, warmup, device))
        rows.append({"stage": stage, "engine": engine, "exit_layer": k, **stats})
        return stats

    state0 = vla.embed(inputs)
    record("vision+embed", "torch", lambda: vla.embed(inputs))
    full = record("llm full (N layers)", "torch", lambda: vla.resume(state0))
    hidden = vla.resume(state0)
    head = record("rfsq head", "torch", lambda: main.head(hidden))
    tok = main.tokenizer.config
    tokens_full = main.tokens_from_logits(main.head(hidden))
    tokens_coarse = tokens_full[..., : tok.coarse_layers]
    for name, decs in setup.decoders.items():
        record(f"decoder c={tok.coarse_layers}", name, lambda d=decs: d[tok.coarse_layers](tokens_coarse))
        record(f"decoder c={tok.num_layers}", name, lambda d=decs: d[tok.num_layers](tokens_full))
    baseline_engine = MainOnlyEngine(main, next(iter(setup.decoders.values()))[tok.num_layers])
    baseline = record("baseline predict_chunk (main only)", "torch", lambda: baseline_engine.run(inputs))
    per_layer: dict[int, dict[str, Any]] = {}
    for k in setup.exit_layers:
        state_k = vla.advance(state0, k)
        prefix = record("llm prefix", "torch", lambda k=k: vla.advance(state0, k), k)
        suffix = record("llm suffix", "torch", lambda s=state_k: vla.resume(s), k)
        for name, draft in setup.drafts.items():
            record("draft", name, lambda d=draft, s=state_k: d(s.query_hidden), k)
        draft_name = next(iter(setup.drafts))
        decoders = setup.decoders[draft_name]
        always = SpeculativeEngine(main, setup.drafts[draft_name], decoders, k, 0.0)
        never = SpeculativeEngine(main, setup.drafts[draft_name], decoders, k, math.inf)
        accept = record("speculative, accept path (tau=0)", draft_name, lambda e=always: e.run(inputs), k)
        reject = record("speculative, reject path (tau=inf)", draft_name, lambda e=never: e.run(inputs), k)
        curve = [{"acceptance": p, "latency_ms": p * accept["p50"] + (1 - p) * reject["p50"]} for p in ACCEPTANCE_GRID]
        per_layer[k] = {"prefix_p50": prefix["p50"], "suffix_p50": suffix["p50"], "accept_p50": accept["p50"],
                        "reject_p50": reject["p50"], "curve": curve}
    measured = None
    if setup.bundle is not None and setup.observations:
        measured = replay_speculative(setup, iters, warmup, tau)
    p = acceptance if acceptance is not None else (measured["acceptance"] if measured else None)
    speedups = {}
    if p is not None:
        for k, entry in per_layer.items():
            expected = p * entry["accept_p50"] + (1 - p) * entry["reject_p50"]
            speedups[k] = {"acceptance": p, "expected_ms": expected, "speedup": baseline["p50"] / expected}
    return {
        "hardware": hardware_card(device, dtype),
        "source": setup.source,
        "iters": iters,
        "warmup_excluded": warmup,
        "rows": rows,
        "baseline_p50": baseline["p50"],
        "llm_full_p50": full["p50"],
        "head_p50": head["p50"],
        "exit_layers": per_layer,
        "acceptance": p,
        "speedup": speedups,
        "replay": measured,
        "num_layers": main.num_layers,
    }


def replay_speculative(setup: BenchSetup, iters: int, warmup: int, tau: float | None) -> dict[str, Any]:
    """Run the baseline and the speculative policy on replayed observations at the bundle's tau."""
    from rsd.runtime.policy import MainOnlyPolicy, SpeculativePolicy

    loaded = setup.bundle
    threshold = loaded.tau if tau is None else tau
    if threshold is None:
        raise ConfigError("bench-latency: the bundle has no calibrated tau; pass --tau.")
    draft_name = next(iter(setup.drafts))
    engine = SpeculativeEngine(setup.main, setup.drafts[draft_name], setup.decoders[draft_name], loaded.exit_layer, threshold,
                               gate_statistic=loaded.gate_statistic)
    spec = SpeculativePolicy(setup.main, engine)
    base = MainOnlyPolicy(setup.main, decoder=setup.decoders[draft_name][setup.main.tokenizer.config.num_layers])
    observations = setup.observations
    for obs in observations[: min(warmup, len(observations))]:
        spec.predict_chunk(obs)
        base.predict_chunk(obs)
    spec_ms, base_ms, accepted = [], [], []
    for i in range(max(iters, len(observations))):
        obs = observations[i % len(observations)]
        chunk = spec.predict_chunk(obs)
        spec_ms.append(chunk.total_ms)
        accepted.append(chunk.accepted)
        base_ms.append(base.predict_chunk(obs).total_ms)
    spec_stats, base_stats = summarize(spec_ms), summarize(base_ms)
    return {
        "observations": len(observations),
        "tau": threshold,
        "engine": draft_name,
        "exit_layer": loaded.exit_layer,
        "acceptance": float(np.mean(accepted)),
        "speculative": spec_stats,
        "baseline": base_stats,
        "speedup": base_stats["p50"] / spec_stats["p50"],
    }


def format_report(report: dict[str, Any]) -> str:
    """The hardware card, the stage table, the expected latency over acceptance and the speed-ups as markdown."""
    lines = ["## Hardware", ""]
    lines += [f"- {k}: {v}" for k, v in report["hardware"].items()]
    lines += ["", f"Model: {report['source']}; {report['iters']} timed iterations after {report['warmup_excluded']} warm-up iterations (excluded).", ""]
    lines += ["## Stages (ms)", "", "| stage | exit layer | engine | mean | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        k = "" if row["exit_layer"] is None else str(row["exit_layer"])
        lines.append(f"| {row['stage']} | {k} | {row['engine']} | {row['mean']:.3f} | {row['p50']:.3f} | {row['p90']:.3f} | {row['p99']:.3f} | {row['max']:.3f} |")
    lines += ["", "## Expected speculative latency (p50 ms) by acceptance p", ""]
    grid = [p["acceptance"] for p in next(iter(report["exit_layers"].values()))["curve"]] if report["exit_layers"] else []
    lines += ["| exit layer | " + " | ".join(f"p={p:.1f}" for p in grid) + " |", "|---|" + "---|" * len(grid)]
    for k, entry in report["exit_layers"].items():
        lines.append(f"| {k} | " + " | ".join(f"{c['latency_ms']:.2f}" for c in entry["curve"]) + " |")
    lines.append("| baseline | " + " | ".join(f"{report['baseline_p50']:.2f}" for _ in grid) + " |")
    if report["speedup"]:
        lines += ["", f"## Speed-up over the baseline at acceptance {report['acceptance']:.3f}", "",
                  "| exit layer | expected ms | baseline ms | speed-up |", "|---|---|---|---|"]
        for k, entry in report["speedup"].items():
            lines.append(f"| {k} | {entry['expected_ms']:.2f} | {report['baseline_p50']:.2f} | {entry['speedup']:.3f}x |")
    if report["replay"]:
        r = report["replay"]
        lines += ["", f"## Replayed observations ({r['observations']}), exit layer {r['exit_layer']}, tau {r['tau']:.4f}, engine {r['engine']}", "",
                  "| policy | p50 ms | p90 ms | p99 ms | acceptance |", "|---|---|---|---|---|",
                  f"| baseline (main only) | {r['baseline']['p50']:.3f} | {r['baseline']['p90']:.3f} | {r['baseline']['p99']:.3f} | - |",
                  f"| speculative | {r['speculative']['p50']:.3f} | {r['speculative']['p90']:.3f} | {r['speculative']['p99']:.3f} | {r['acceptance']:.3f} |",
                  "", f"Measured speed-up: {r['speedup']:.3f}x"]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """Latency against acceptance for each exit layer, the baseline, and the measured point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, entry in report["exit_layers"].items():
        ax.plot([c["acceptance"] for c in entry["curve"]], [c["latency_ms"] for c in entry["curve"]], label=f"speculative, exit layer {k}")
    ax.axhline(report["baseline_p50"], color="k", linestyle="--", label="baseline (main only)")
    if report["replay"]:
        r = report["replay"]
        ax.plot([r["acceptance"]], [r["speculative"]["p50"]], "r*", markersize=12, label=f"measured (k={r['exit_layer']})")
    ax.set_xlabel("acceptance rate p")
    ax.set_ylabel("p50 latency per chunk (ms)")
    ax.set_title(f"{report['source']}\n{report['hardware'].get('gpu', report['hardware']['cpu'])}, {report['hardware']['dtype']}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def json_line(report: dict[str, Any]) -> str:
    """The one-line JSON summary printed last."""
    summary = {
        "source": report["source"],
        "device": report["hardware"].get("gpu", report["hardware"]["device"]),
        "dtype": report["hardware"]["dtype"],
        "baseline_p50_ms": round(report["baseline_p50"], 4),
        "exit_layers": {str(k): {"accept_p50_ms": round(v["accept_p50"], 4), "reject_p50_ms": round(v["reject_p50"], 4)}
                        for k, v in report["exit_layers"].items()},
        "acceptance": report["acceptance"],
        "speedup": {str(k): round(v["speedup"], 4) for k, v in report["speedup"].items()},
        "replay_speedup": None if not report["replay"] else round(report["replay"]["speedup"], 4),
    }
    return json.dumps(summary)


def run_bench_latency(
    bundle: str | Path | None = None,
    main: str | Path | None = None,
    preset: str | None = None,
    random_weights: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    iters: int = 50,
    warmup: int = 10,
    exit_layers: list[int] | None = None,
    acceptance: float | None = None,
    observations: str | Path | None = None,
    replay: int = 64,
    tau: float | None = None,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    markdown_path: str | Path | None = None,
) -> dict[str, Any]:
    """The whole bench-latency command: build the setup, measure, write JSON/plot/markdown, return the report."""
    if (bundle is None) == (preset is None):
        raise ConfigError("bench-latency: give either --bundle with --main, or --preset with --random-weights.")
    if acceptance is not None and not 0.0 <= acceptance <= 1.0:
        raise ConfigError(f"bench-latency --acceptance: expected a value in [0, 1], got {acceptance}.")
    torch_device, torch_dtype = resolve_device_dtype(device, dtype)
    if preset is not None:
        if not random_weights:
            raise ConfigError("bench-latency --preset needs --random-weights (a preset alone has no trained weights).")
        n = get_preset(preset).model.llm.num_layers
        layers = exit_layers or [n // 4, n // 2, 3 * n // 4]
        setup = random_setup(preset, torch_device, torch_dtype, layers)
    else:
        if main is None:
            raise ConfigError("bench-latency --bundle needs --main (the policy folder the bundle was made for).")
        setup = bundle_setup(bundle, main, torch_device, torch_dtype, exit_layers, observations, replay)
    report = bench_latency(setup, iters, warmup, acceptance, tau)
    report["markdown"] = format_report(report)
    if json_path:
        Path(json_path).write_text(json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=2, default=str) + "\n")
    if plot_path:
        plot_report(report, plot_path)
    if markdown_path:
        Path(markdown_path).write_text(report["markdown"])
    return report
