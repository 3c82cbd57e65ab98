"""Benchmark reports: the hardware card and stage table as markdown, the latency-over-acceptance plot, one JSON line.

Usage:
    print(format_report(report)); plot_report(report, "bench.png"); print(json_line(report))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def format_report(report: dict[str, Any]) -> str:
    """The hardware card, the stage table, the expected latency over acceptance and the speed-ups as markdown."""
    lines = ["## Hardware", ""]
    lines += [f"- {k}: {v}" for k, v in report["hardware"].items()]
    for warning in (report.get("noise_warning"), (report.get("compile") or {}).get("noise_warning")):
        if warning:
            lines += ["", f"**Warning: {warning}**"]
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
        lines += ["", f"## Speculative / baseline at acceptance {report['acceptance']:.3f} (interleaved A/B, bootstrap 95 % interval)", "",
                  "Measured: the baseline, the accept path and the reject path called in turn on the same inputs; the speculative "
                  "time of an iteration is p * accept + (1 - p) * reject. The stage-sum column adds stages timed one by one "
                  "(a model, not a measurement).", "",
                  "| exit layer | speculative ms | baseline ms | ratio | 95 % interval | speed-up | stage-sum ratio |",
                  "|---|---|---|---|---|---|---|"]
        for k, entry in report["speedup"].items():
            lines.append(f"| {k} | {entry['speculative_ms']:.2f} | {entry['baseline_ms']:.2f} | {entry['ratio']:.3f} | "
                         f"{entry['ratio_low']:.3f}-{entry['ratio_high']:.3f} | {entry['speedup']:.3f}x | {entry['stage_sum_ratio']:.3f} |")
        lines += ["", "Spread (p90/p50) of the interleaved series: " + ", ".join(f"{k} {v:.2f}" for k, v in report["spread"].items())]
    if report["replay"]:
        r = report["replay"]
        lines += ["", f"## Replayed observations ({r['observations']}), exit layer {r['exit_layer']}, tau {r['tau']:.4f}, engine {r['engine']}", "",
                  "| policy | p50 ms | p90 ms | p99 ms | acceptance |", "|---|---|---|---|---|",
                  f"| baseline (main only) | {r['baseline']['p50']:.3f} | {r['baseline']['p90']:.3f} | {r['baseline']['p99']:.3f} | - |",
                  f"| speculative | {r['speculative']['p50']:.3f} | {r['speculative']['p90']:.3f} | {r['speculative']['p99']:.3f} | {r['acceptance']:.3f} |",
                  "", f"Measured speed-up per chunk: {r['speedup']:.3f}x (speculative / baseline {r['ratio_ci']['ratio']:.3f}, 95 % interval "
                  f"{r['ratio_ci']['low']:.3f}-{r['ratio_ci']['high']:.3f}, interleaved); {r['steps_per_chunk']:.2f} steps executed per speculative "
                  f"chunk, so per control step (mean times): {r['per_step_speedup']:.3f}x"]
    if report.get("compile"):
        lines += format_compile(report["compile"])
    return "\n".join(lines) + "\n"


def format_compile(comparison: dict[str, Any]) -> list[str]:
    """Markdown lines of the eager-vs-compiled comparison: every stage, then the chunks end to end."""
    lines = ["", f"## Eager vs compiled ({comparison['mode']}), interleaved A/B, bootstrap 95 % interval", "",
             f"Compile and warm-up: {comparison['compile_seconds']:.1f} s (excluded), {comparison['graphs']} graphs, "
             f"{comparison['recompiles']} recompiles while timing; prompt {comparison['prompt_tokens']} tokens.", "",
             "| stage | exit layer | eager p50 ms | compiled p50 ms | compiled / eager | 95 % interval | p90/p50 |", "|---|---|---|---|---|---|---|"]
    for row in comparison["stages"]:
        k = "" if row["exit_layer"] is None else str(row["exit_layer"])
        lines.append(f"| {row['stage']} | {k} | {row['eager']['p50']:.3f} | {row['compiled']['p50']:.3f} | {row['ratio']:.3f} | "
                     f"{row['ratio_low']:.3f}-{row['ratio_high']:.3f} | {row['spread']:.2f} |")
    lines += ["", "| chunk (end to end) | eager p50 ms | compiled p50 ms | compiled / eager | 95 % interval | p90/p50 |", "|---|---|---|---|---|---|"]
    for row in comparison["chunks"]:
        lines.append(f"| {row['path']} | {row['eager']['p50']:.3f} | {row['compiled']['p50']:.3f} | {row['ratio']:.3f} | "
                     f"{row['ratio_low']:.3f}-{row['ratio_high']:.3f} | {row['spread']:.2f} |")
    lines += ["", "| path / baseline | ratio | 95 % interval |", "|---|---|---|"]
    for name, entry in comparison["versus_baseline"].items():
        lines.append(f"| {name} | {entry['ratio']:.3f} | {entry['ratio_low']:.3f}-{entry['ratio_high']:.3f} |")
    return lines


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
        "ratio_ci": {str(k): [round(v["ratio_low"], 4), round(v["ratio_high"], 4)] for k, v in report["speedup"].items()},
        "noisy": report["noise_warning"] is not None,
        "replay_speedup": None if not report["replay"] else round(report["replay"]["speedup"], 4),
    }
    if report.get("compile"):
        summary["compile"] = {"mode": report["compile"]["mode"], "recompiles": report["compile"]["recompiles"],
                              **{row["path"]: round(row["ratio"], 4) for row in report["compile"]["chunks"]}}
    return json.dumps(summary)
