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

With `--flops` nothing is timed: the preset's FLOPs per stage and per chunk are counted on the meta device
(`rsd.bench.flops`) for the plain model and each CogVLA module added in the seed's debug order, at the first exit
layer given (default N/2) and the given acceptance (default 0.7).

Headline ratios come from interleaved calls on the same inputs (baseline, accept path, reject path, baseline, ...)
with a paired bootstrap interval, and the report warns when a series' p90/p50 says the machine was too noisy
(`rsd.bench.timing`); the stage-sum model stays as a secondary column. With `--compile` the report adds every stage
and the baseline and speculative chunks eager against compiled (`rsd.runtime.compiled`), interleaved in the same run.

Usage:
    rsd bench-latency --preset tiny --random-weights --device cpu --exit-layers 3 --acceptance 0.7 --compile
    rsd bench-latency --preset openvla-7b --random-weights --device cuda --dtype fp16 --exit-layers 8,16,24
    rsd bench-latency --bundle runs/demo/bundle --main runs/demo/policy --observations runs/demo/demos.hdf5
    rsd bench-latency --preset openvla-7b --flops --exit-layers 16 --acceptance 0.7
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd.bench.flops import FLOP_PROMPT_TOKENS, flops_report, format_flops
from rsd.bench.report import format_report, plot_report
from rsd.bench.setup import BenchSetup, bundle_setup, random_setup
from rsd.bench.timing import hardware_card, interleaved, noise_warning, ratio_ci, spread, time_calls
from rsd.data.source import DataSource
from rsd.device import resolve_device_dtype
from rsd.errors import ConfigError
from rsd.io import atomic_file, write_text_atomic
from rsd.presets import get_preset
from rsd.runtime.compiled import CompileConfig, CompiledSegments, Segments
from rsd.runtime.gate import Gate
from rsd.runtime.policy import MainOnlyPolicy, SpeculativePolicy
from rsd.runtime.speculative import MainOnlyEngine, SpeculativeEngine
from rsd.runtime.timing import summarize

log = logging.getLogger(__name__)

ACCEPTANCE_GRID = [round(0.1 * i, 1) for i in range(11)]


@torch.inference_mode()
def bench_latency(setup: BenchSetup, iters: int = 50, warmup: int = 10, acceptance: float | None = None,
                  tau: float | None = None, compile: CompileConfig | str = "none",
                  clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Time every stage, then the baseline and the speculative paths interleaved; return the report (see `format_report`).

    With `compile` set, also every stage and both policies eager against compiled (`compile_comparison`).
    """
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
    stages = {"vision": record("vision+embed", "torch", lambda: vla.embed(inputs))}
    full = record("llm full (N layers)", "torch", lambda: vla.resume(state0))
    hidden = vla.resume(state0)
    stages["head"] = record("rfsq head", "torch", lambda: main.head(hidden))
    tok = main.tokenizer.config
    tokens_full = main.tokens_from_logits(main.head(hidden))
    tokens_coarse = tokens_full[..., : tok.coarse_layers]
    for name, decs in setup.decoders.items():
        stages[f"decoder c={tok.coarse_layers} {name}"] = record(f"decoder c={tok.coarse_layers}", name,
                                                                 lambda d=decs: d[tok.coarse_layers](tokens_coarse))
        stages[f"decoder c={tok.num_layers} {name}"] = record(f"decoder c={tok.num_layers}", name, lambda d=decs: d[tok.num_layers](tokens_full))
    draft_name = next(iter(setup.drafts))
    decoders = setup.decoders[draft_name]
    per_layer: dict[int, dict[str, Any]] = {}
    base_engine = MainOnlyEngine(main, decoders[tok.num_layers])
    paths: dict[str, Callable[[], Any]] = {"baseline": lambda: base_engine.run(inputs)}
    for k in setup.exit_layers:
        state_k = vla.advance(state0, k)
        prefix = record("llm prefix", "torch", lambda k=k: vla.advance(state0, k), k)
        suffix = record("llm suffix", "torch", lambda s=state_k: vla.resume(s), k)
        drafts = {name: record("draft", name, lambda d=draft, s=state_k: d(s.query_hidden), k) for name, draft in setup.drafts.items()}
        per_layer[k] = {"prefix_p50": prefix["p50"], "suffix_p50": suffix["p50"], "draft_p50": drafts[draft_name]["p50"]}
        always = SpeculativeEngine(main, setup.drafts[draft_name], decoders, k, Gate(tau=0.0))
        never = SpeculativeEngine(main, setup.drafts[draft_name], decoders, k, Gate(tau=math.inf))
        paths[f"accept {k}"] = lambda e=always: e.run(inputs)
        paths[f"reject {k}"] = lambda e=never: e.run(inputs)
    # The headline: baseline and both speculative paths called in turn on the same inputs.
    runs = interleaved(paths, iters, warmup, device, clock)
    baseline = _row(rows, "baseline predict_chunk (main only)", "torch", None, runs["baseline"])
    for k, entry in per_layer.items():
        accept = _row(rows, "speculative, accept path (tau=0)", draft_name, k, runs[f"accept {k}"])
        reject = _row(rows, "speculative, reject path (tau=inf)", draft_name, k, runs[f"reject {k}"])
        entry.update(accept_p50=accept["p50"], reject_p50=reject["p50"],
                     curve=[{"acceptance": p, "latency_ms": p * accept["p50"] + (1 - p) * reject["p50"]} for p in ACCEPTANCE_GRID])
    measured = None
    if setup.bundle is not None and setup.observations:
        measured = replay_speculative(setup, iters, warmup, tau)
    p = acceptance if acceptance is not None else (measured["acceptance"] if measured else None)
    speedups = {}
    if p is not None:
        base_sum = stage_sum(stages["vision"]["p50"], full["p50"], stages["head"]["p50"], stages[f"decoder c={tok.num_layers} {draft_name}"]["p50"])
        for k, entry in per_layer.items():
            mixed = p * np.asarray(runs[f"accept {k}"]) + (1 - p) * np.asarray(runs[f"reject {k}"])
            ratio = ratio_ci(mixed, runs["baseline"])
            spec_sum = stage_sum(stages["vision"]["p50"], entry["prefix_p50"], entry["draft_p50"],
                                 p * stages[f"decoder c={tok.coarse_layers} {draft_name}"]["p50"],
                                 (1 - p) * (entry["suffix_p50"] + stages["head"]["p50"] + stages[f"decoder c={tok.num_layers} {draft_name}"]["p50"]))
            speedups[k] = {"acceptance": p, "speculative_ms": float(np.median(mixed)), "baseline_ms": baseline["p50"],
                           "ratio": ratio["ratio"], "ratio_low": ratio["low"], "ratio_high": ratio["high"], "speedup": 1 / ratio["ratio"],
                           "stage_sum_ratio": spec_sum / base_sum}
    report = {
        "hardware": hardware_card(device, dtype),
        "source": setup.source,
        "iters": iters,
        "warmup_excluded": warmup,
        "rows": rows,
        "baseline_p50": baseline["p50"],
        "llm_full_p50": full["p50"],
        "head_p50": stages["head"]["p50"],
        "exit_layers": per_layer,
        "acceptance": p,
        "speedup": speedups,
        "spread": {name: spread(values) for name, values in runs.items()},
        "noise_warning": noise_warning(runs),
        "replay": measured,
        "num_layers": main.num_layers,
        "compile": None,
    }
    if CompileConfig.of(compile).mode != "none":
        report["compile"] = compile_comparison(setup, iters, warmup, compile, clock)
    for warning in (report["noise_warning"], (report["compile"] or {}).get("noise_warning")):
        if warning:
            log.warning("bench-latency: %s", warning)
    return report


def stage_sum(*stages_ms: float) -> float:
    """The stage-sum model: a chunk's latency as the sum of its stages' separately timed p50s (a secondary figure)."""
    return float(sum(stages_ms))


def _row(rows: list[dict[str, Any]], stage: str, engine: str, k: int | None, times: list[float]) -> dict[str, float]:
    """Append a table row for a measured series and return its summary."""
    stats = summarize(times)
    rows.append({"stage": stage, "engine": engine, "exit_layer": k, **stats})
    return stats


@torch.inference_mode()
def compile_comparison(setup: BenchSetup, iters: int, warmup: int, compile: CompileConfig | str,
                       clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Every stage and the baseline / speculative chunks, eager against compiled, each pair called in turn on the same inputs.

    The compiled graphs take the inputs' own prompt length (no padding), so both sides compute the same thing; the
    compile and warm-up time is reported apart and excluded.
    """
    main, inputs = setup.main, setup.inputs
    device = next(main.vla.parameters()).device
    tok = main.tokenizer.config
    config = dataclasses.replace(CompileConfig.of(compile), prompt_tokens=int(inputs.input_ids.shape[1]), batch=inputs.batch_size)
    compiled = CompiledSegments(main, config)
    eager = Segments(main)
    draft_name = next(iter(setup.drafts))
    draft, decoders = setup.drafts[draft_name], setup.decoders[draft_name]
    started = time.perf_counter()
    engines: dict[str, dict[str, Any]] = {}
    for name, segments in (("eager", eager), ("compiled", compiled)):
        engines[name] = {"baseline": MainOnlyEngine(main, decoders[tok.num_layers], segments)}
        for k in setup.exit_layers:
            engines[name][f"accept {k}"] = SpeculativeEngine(main, draft, decoders, k, Gate(tau=0.0), segments=segments)
            engines[name][f"reject {k}"] = SpeculativeEngine(main, draft, decoders, k, Gate(tau=math.inf), segments=segments)
    for engine in engines["compiled"].values():
        engine.warm_up(inputs)
    compile_seconds = time.perf_counter() - started
    x = compiled.prepare(inputs)  # the inputs both sides run on, made as the compiled graphs expect (eager takes them unchanged)
    rows = []
    series: dict[str, list[float]] = {}

    def pair(stage: str, k: int | None, make: Callable[[Segments, dict[str, Any]], Callable[[], Any]]) -> None:
        """Time one stage eager and compiled in turn (`make(segments, engines)` gives the call); add its row."""
        fns = {name: make(segments, engines[name]) for name, segments in (("eager", eager), ("compiled", compiled))}
        runs = interleaved(fns, iters, warmup, device, clock)
        ratio = ratio_ci(runs["compiled"], runs["eager"])
        series.update({f"{stage} {k or ''} {name}".strip(): values for name, values in runs.items()})
        rows.append({"stage": stage, "exit_layer": k, "eager": summarize(runs["eager"]), "compiled": summarize(runs["compiled"]),
                     "ratio": ratio["ratio"], "ratio_low": ratio["low"], "ratio_high": ratio["high"],
                     "spread": max(spread(runs["eager"]), spread(runs["compiled"]))})

    state0 = eager.embed(x)
    pair("vision+embed", None, lambda s, e: lambda: s.embed(x))
    for k in setup.exit_layers:
        state_k = eager.advance(state0, k)
        pair("llm prefix", k, lambda s, e, k=k: lambda: s.advance(state0, k))
        pair("llm suffix", k, lambda s, e, st=state_k: lambda: s.resume(st))
    pair("llm full (N layers)", None, lambda s, e: lambda: s.resume(state0))
    hidden = eager.resume(state0)
    pair("rfsq head", None, lambda s, e: lambda: s.head(hidden))
    tokens_full = eager.head(hidden)
    accept = f"accept {setup.exit_layers[0]}"
    pair("draft", setup.exit_layers[0], lambda s, e: lambda: e[accept].draft(state0.query_hidden))
    pair(f"decoder c={tok.coarse_layers}", None, lambda s, e: lambda: e[accept].decoders[tok.coarse_layers](tokens_full[..., : tok.coarse_layers]))
    pair(f"decoder c={tok.num_layers}", None, lambda s, e: lambda: e["baseline"].full_decoder(tokens_full))
    # End to end: every policy path eager and compiled, all called in turn in one loop.
    chunks = interleaved({f"{path} {name}": (lambda e=engines[name][path]: e.run(x))
                          for path in engines["eager"] for name in ("eager", "compiled")}, iters, warmup, device, clock)
    end_to_end = []
    for path in engines["eager"]:
        ratio = ratio_ci(chunks[f"{path} compiled"], chunks[f"{path} eager"])
        end_to_end.append({"path": path, "eager": summarize(chunks[f"{path} eager"]), "compiled": summarize(chunks[f"{path} compiled"]),
                           "ratio": ratio["ratio"], "ratio_low": ratio["low"], "ratio_high": ratio["high"],
                           "spread": max(spread(chunks[f"{path} eager"]), spread(chunks[f"{path} compiled"]))})
    versus_baseline = {}
    for path in engines["eager"]:
        if path != "baseline":
            for name in ("eager", "compiled"):
                ratio = ratio_ci(chunks[f"{path} {name}"], chunks[f"baseline {name}"])
                versus_baseline[f"{path} {name}"] = {"ratio": ratio["ratio"], "ratio_low": ratio["low"], "ratio_high": ratio["high"]}
    series.update(chunks)
    return {"mode": compiled.mode, "compile_seconds": compile_seconds, "graphs": compiled.graphs, "recompiles": compiled.recompiles,
            "prompt_tokens": config.prompt_tokens, "stages": rows, "chunks": end_to_end, "versus_baseline": versus_baseline,
            "noise_warning": noise_warning(series)}


def replay_speculative(setup: BenchSetup, iters: int, warmup: int, tau: float | None) -> dict[str, Any]:
    """Run the baseline and the speculative policy on replayed observations at the bundle's gate (`tau` replaces its threshold)."""
    loaded = setup.bundle
    gate = loaded.gate if tau is None else dataclasses.replace(loaded.gate, tau=tau)
    draft_name = next(iter(setup.drafts))
    engine = SpeculativeEngine(setup.main, setup.drafts[draft_name], setup.decoders[draft_name], loaded.exit_layer, gate)
    spec = SpeculativePolicy(setup.main, engine)
    base = MainOnlyPolicy(setup.main, decoder=setup.decoders[draft_name][setup.main.tokenizer.config.num_layers])
    observations = setup.observations
    for obs in observations[: min(warmup, len(observations))]:
        spec.predict_chunk(obs)
        base.predict_chunk(obs)
    spec_ms, base_ms, accepted, steps = [], [], [], []
    for i in range(max(iters, len(observations))):
        obs = observations[i % len(observations)]
        chunk = spec.predict_chunk(obs)
        spec_ms.append(chunk.total_ms)
        accepted.append(chunk.accepted)
        steps.append(chunk.steps)
        base_ms.append(base.predict_chunk(obs).total_ms)
    spec_stats, base_stats = summarize(spec_ms), summarize(base_ms)
    return {
        "observations": len(observations),
        "tau": gate.tau,
        "gate": gate.to_json(),
        "engine": draft_name,
        "exit_layer": loaded.exit_layer,
        "acceptance": float(np.mean(accepted)),
        "mean_accepted_steps": float(np.mean([s for s, a in zip(steps, accepted, strict=True) if a])) if any(accepted) else math.nan,
        "speculative": spec_stats,
        "baseline": base_stats,
        "speedup": base_stats["p50"] / spec_stats["p50"],
        "ratio_ci": ratio_ci(spec_ms, base_ms),  # speculative / baseline: the policies were called in turn on each observation
        "spread": {"speculative": spread(spec_ms), "baseline": spread(base_ms)},
        "steps_per_chunk": float(np.mean(steps)),
        # prefix acceptance executes fewer steps per chunk, so compare the compute per executed control step
        "per_step_speedup": (base_stats["mean"] / setup.main.tokenizer.config.chunk_len) / (spec_stats["mean"] / float(np.mean(steps))),
    }


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
    observations: str | Path | DataSource | None = None,
    replay: int = 64,
    tau: float | None = None,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    markdown_path: str | Path | None = None,
    flops: bool = False,
    prompt_tokens: int | None = None,
    compile: CompileConfig | str = "none",
) -> dict[str, Any]:
    """The whole bench-latency command: build the setup, measure (or count FLOPs), write JSON/plot/markdown, return the report."""
    if acceptance is not None and not 0.0 <= acceptance <= 1.0:
        raise ConfigError(f"bench-latency --acceptance: expected a value in [0, 1], got {acceptance}.")
    if not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"bench-latency --iters: expected an int >= 1 (timed iterations per stage), got {iters!r}.")
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"bench-latency --warmup: expected an int >= 0, got {warmup!r}.")
    if flops:
        if preset is None or bundle is not None:
            raise ConfigError("bench-latency --flops: counts a preset's shapes on the meta device; give --preset (no weights needed), not --bundle.")
        report = flops_report(preset, exit_layers[0] if exit_layers else None, 0.7 if acceptance is None else acceptance,
                              prompt_tokens or FLOP_PROMPT_TOKENS)
        report["markdown"] = format_flops(report)
        _write_outputs(report, json_path, markdown_path)
        return report
    if (bundle is None) == (preset is None):
        raise ConfigError("bench-latency: give either --bundle with --main, or --preset with --random-weights.")
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
    report = bench_latency(setup, iters, warmup, acceptance, tau, compile)
    report["markdown"] = format_report(report)
    _write_outputs(report, json_path, markdown_path)
    if plot_path:
        with atomic_file(plot_path) as image:
            plot_report(report, image)
    return report


def _write_outputs(report: dict[str, Any], json_path: str | Path | None, markdown_path: str | Path | None) -> None:
    """Write the report as JSON (without its markdown) and its markdown, where asked, each atomically."""
    if json_path:
        write_text_atomic(json_path, json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=2, default=str) + "\n")
    if markdown_path:
        write_text_atomic(markdown_path, report["markdown"])
