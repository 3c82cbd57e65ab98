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
                  "", f"Measured speed-up per chunk: {r['speedup']:.3f}x; {r['steps_per_chunk']:.2f} steps executed per speculative "
                  f"chunk, so per control step (mean times): {r['per_step_speedup']:.3f}x"]
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
