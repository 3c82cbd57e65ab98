"""bench-text: plain decoding against speculative decoding with layer-sampled drafts, on the tiny Qwen3 LM.

One process, one run: every prompt (a window of a held-out stdlib file) is decoded plainly and by the speculative
decoder with each draft, in an order that rotates from prompt to prompt (interleaved A/B, so load changes on a
shared machine hit every variant alike); the first prompt is a labelled, untimed warm-up. For every variant: whether
its output equals plain greedy output token for token (greedy runs), tokens per target pass, acceptance per draft
position and the histogram of accepted counts, ms per token (p50 / p90 / worst over prompts), and the wall-time ratio
against plain decoding (sum over prompts, and the median of the per-prompt ratios) beside the CPU-time ratio (the
process's own CPU seconds, which time spent waiting for a core on a loaded machine does not inflate). With `repeats`
> 1 every prompt and variant runs that many times, interleaved, and the fastest run counts (as `timeit` does).
Knowledge-enhanced drafts get, per prompt, a knowledge KV cache built from the rest of the prompt's file (built before
the timed call; its build time is reported on its own).

Usage:
    rsd bench-text --lm runs/text_lm --draft runs/text_lm/seed_tuned --draft runs/text_lm/four_tuned --repeats 3 --json bench.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd.bench.timing import hardware_card
from rsd.errors import ConfigError, DataError
from rsd.models.layer_draft import LayerDraft, build_knowledge_memory
from rsd.models.text_lm import TextLM, load_text_lm
from rsd.runtime.decoding import (
    DecodeStats,
    HFCausalLM,
    LayerDraftLM,
    SamplingConfig,
    SpeculativeDecoder,
    generate_plain,
)
from rsd.training.layer_draft import knowledge_tokens
from rsd.training.text_lm import read_texts, split_files, stdlib_sources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextBenchConfig:
    """What bench-text measures."""

    prompts: int = 8  # timed prompts (one more is the warm-up)
    prompt_tokens: int = 64  # tokens per prompt
    new_tokens: int = 128  # tokens generated per prompt
    gamma: int = 5  # draft tokens per round (the seed's 5)
    memory_tokens: int = 512  # knowledge drafts: tokens of the prompt's file in the knowledge cache
    repeats: int = 1  # timed runs per prompt and variant, interleaved; the fastest counts (the least disturbed on a shared machine)
    temperature: float = 0.0  # 0: greedy, outputs checked against plain decoding's; > 0: sampled (one seed per prompt)
    top_p: float = 1.0  # nucleus of sampled decoding
    seed: int = 0  # picks the prompt windows and seeds sampling

    def __post_init__(self) -> None:
        for name in ("prompts", "prompt_tokens", "new_tokens", "gamma", "memory_tokens", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"TextBenchConfig.{name}: expected a positive int, got {value!r}.")
        SamplingConfig(temperature=self.temperature, top_p=self.top_p)  # refuses a bad temperature or top_p

    @property
    def sampling(self) -> SamplingConfig:
        """How tokens are chosen, for plain and speculative decoding alike."""
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p)


@dataclass
class Prompt:
    """One benchmark prompt: its ids and the knowledge memory ids from the rest of its file."""

    source: str  # file name
    ids: torch.Tensor  # [1, P]
    memory_ids: torch.Tensor  # [M]


def held_out_prompts(lm: TextLM, config: TextBenchConfig, files: Sequence[Path] | None = None, root: str | Path | None = None) -> list[Prompt]:
    """`prompts + 1` prompt windows from held-out files long enough for the prompt, the generation and the memory."""
    _, held = split_files(list(files) if files is not None else stdlib_sources(root), root)
    span = config.prompt_tokens + config.new_tokens
    rng = np.random.default_rng(config.seed)
    prompts = []
    for file, text in zip(held, read_texts(held), strict=True):
        stream = np.asarray(lm.tokenizer.encode(text).ids, dtype=np.int64)
        if stream.shape[0] < span + config.memory_tokens:
            continue
        start = int(rng.integers(0, stream.shape[0] - span + 1))
        prompts.append(Prompt(file.name, torch.from_numpy(stream[start : start + config.prompt_tokens]).unsqueeze(0),
                              torch.from_numpy(knowledge_tokens(stream, start, span, config.memory_tokens))))
    if len(prompts) < config.prompts + 1:
        raise DataError(f"bench-text: expected {config.prompts + 1} held-out files of at least {span + config.memory_tokens} tokens, "
                        f"found {len(prompts)}; ask for fewer prompts or tokens.")
    order = rng.permutation(len(prompts))[: config.prompts + 1]
    return [prompts[i] for i in order]


def run_bench_text(lm_dir: str | Path, draft_dirs: Sequence[str | Path], config: TextBenchConfig | None = None,
                   json_path: str | Path | None = None, files: Sequence[Path] | None = None, root: str | Path | None = None) -> dict[str, Any]:
    """Measure plain vs speculative decoding for every draft; return the report (markdown included)."""
    config = config or TextBenchConfig()
    if not draft_dirs:
        raise ConfigError("bench-text: expected at least one --draft folder, got none.")
    lm = load_text_lm(lm_dir)
    target = HFCausalLM(lm.model)
    drafts = {Path(d).name: LayerDraft.load(d, lm.model, lm.fingerprint) for d in draft_dirs}
    if len(drafts) != len(draft_dirs):
        raise ConfigError(f"bench-text: expected drafts in folders of different names, got {list(map(str, draft_dirs))}.")
    sampling = config.sampling
    decoders = {name: SpeculativeDecoder(LayerDraftLM(draft), target, config.gamma, sampling) for name, draft in drafts.items()}
    prompts = held_out_prompts(lm, config, files, root)
    names = ["plain", *decoders]
    seconds: dict[str, list[float]] = {name: [] for name in names}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in names}
    stats = {name: DecodeStats(config.gamma if name != "plain" else 0) for name in names}
    identical = {name: 0 for name in decoders}
    knowledge_ms: list[float] = []
    samples: dict[str, str] = {}
    for index, prompt in enumerate(prompts):
        warmup = index == 0
        for draft in drafts.values():
            if draft.config.knowledge:
                began = time.perf_counter()
                draft.set_knowledge(build_knowledge_memory(lm.model, [prompt.memory_ids], max_tokens=config.memory_tokens))
                if not warmup:
                    knowledge_ms.append(1e3 * (time.perf_counter() - began))
        outputs: dict[str, list[int]] = {}
        fastest = {name: (np.inf, np.inf) for name in names}  # (wall, CPU) seconds, the least disturbed of the repeats
        for repeat in range(config.repeats):
            for name in names[index % len(names) :] + names[: index % len(names)]:  # rotate the order per prompt
                generator = torch.Generator().manual_seed(config.seed * 100_003 + index)  # sampled runs: one seed per prompt
                began, began_cpu = time.perf_counter(), time.process_time()
                if name == "plain":
                    result = generate_plain(target, prompt.ids, config.new_tokens, sampling, generator)
                else:
                    result = decoders[name].generate(prompt.ids, config.new_tokens, generator)
                elapsed = (time.perf_counter() - began, time.process_time() - began_cpu)
                fastest[name] = (min(fastest[name][0], elapsed[0]), min(fastest[name][1], elapsed[1]))
                if repeat == 0:
                    outputs[name] = result.tokens
                    if not warmup:
                        stats[name].add(result.stats)
        if not warmup:
            for name in names:
                seconds[name].append(fastest[name][0])
                cpu_seconds[name].append(fastest[name][1])
        if not warmup:
            for name in decoders:
                identical[name] += int(outputs[name] == outputs["plain"])
            if not samples:
                samples = {"source": prompt.source, "prompt": lm.decode(prompt.ids[0].tolist()), "plain": lm.decode(outputs["plain"])}
        log.info("bench-text prompt %d/%d (%s)%s", index + 1, len(prompts), prompt.source, " warm-up" if warmup else "")
    report = _report(config, lm, drafts, seconds, cpu_seconds, stats, identical, knowledge_ms, samples)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _report(config: TextBenchConfig, lm: TextLM, drafts: dict[str, LayerDraft], seconds: dict[str, list[float]],
            cpu_seconds: dict[str, list[float]], stats: dict[str, DecodeStats], identical: dict[str, int], knowledge_ms: list[float],
            samples: dict[str, str]) -> dict[str, Any]:
    """The JSON report and its markdown tables."""
    plain, plain_cpu = np.asarray(seconds["plain"]), np.asarray(cpu_seconds["plain"])
    rows = {}
    for name in seconds:
        times = np.asarray(seconds[name])
        summary = stats[name].summary()
        per_token = 1e3 * times / config.new_tokens
        row = {"seconds": float(times.sum()), "tokens_per_second": summary["generated"] / float(times.sum()),
               "ms_per_token": {"p50": float(np.median(per_token)), "p90": float(np.percentile(per_token, 90)), "worst": float(per_token.max())},
               "tokens_per_target_pass": summary["tokens_per_target_pass"], "speedup": float(plain.sum() / times.sum()),
               "speedup_median_prompt": float(np.median(plain / times)),
               "cpu_time_speedup": float(plain_cpu.sum() / np.asarray(cpu_seconds[name]).sum())}
        if name != "plain":
            draft = drafts[name]
            row.update({"layers": list(draft.config.layers), "knowledge": draft.config.knowledge, "tuned_layers": draft.config.tune_layers,
                        "identical_outputs": f"{identical[name]}/{len(times)}" if config.sampling.greedy else None,
                        "acceptance_rate": summary["acceptance_rate"], "acceptance_by_position": summary["acceptance_by_position"],
                        "accepted_histogram": summary["accepted_histogram"], "mean_accepted_per_round": summary["mean_accepted_per_round"],
                        "draft_parameters": sum(p.numel() for p in draft.parameters())})
        rows[name] = row
    report = {"hardware": hardware_card(torch.device("cpu"), torch.float32), "config": dataclasses.asdict(config),
              "model": {"layers": lm.config.num_layers, "hidden": lm.config.hidden_size, "vocab": lm.config.vocab_size,
                        "parameters": sum(p.numel() for p in lm.model.parameters()), "fingerprint": lm.fingerprint},
              "warmup": "the first prompt, untimed, excluded from every figure", "variants": rows,
              "knowledge_cache_build_ms": float(np.mean(knowledge_ms)) if knowledge_ms else None, "sample": samples}
    report["markdown"] = format_text_report(report)
    return report


def format_text_report(report: dict[str, Any]) -> str:
    """Markdown: the hardware card, the variant table, acceptance by draft position and the accepted-count histogram."""
    card, config = report["hardware"], report["config"]
    mode = "greedy" if config["temperature"] == 0 else f"sampled (temperature {config['temperature']}, top-p {config['top_p']})"
    lines = [f"bench-text on {card['cpu']} ({card['cpu_threads']} torch thread(s)), torch {card['torch']}, {card['date']}; "
             f"model {report['model']['layers']} layers x {report['model']['hidden']}, {report['model']['parameters'] / 1e6:.2f} M parameters; "
             f"{config['prompts']} held-out prompts x {config['new_tokens']} new tokens, gamma {config['gamma']}, {mode}; "
             f"the fastest of {config['repeats']} interleaved run(s) per prompt and variant; the warm-up prompt is excluded.", "",
             "| variant | layers | tuned layers | knowledge | identical to plain | tokens / target pass | acceptance | mean accepted / round | "
             "ms / token p50 | p90 | worst | wall-time ratio (sum) | ratio (median prompt) | CPU-time ratio (sum) |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in report["variants"].items():
        latency = row["ms_per_token"]
        times = f"{latency['p50']:.1f} | {latency['p90']:.1f} | {latency['worst']:.1f}"
        if name == "plain":
            lines.append(f"| plain | all | - | - | - | {row['tokens_per_target_pass']:.2f} | - | - | {times} | 1.00x | 1.00x | 1.00x |")
            continue
        same = row["identical_outputs"] or "- (sampled)"
        lines.append(f"| {name} | {','.join(map(str, row['layers']))} | {'yes' if row['tuned_layers'] else 'no'} | "
                     f"{'yes' if row['knowledge'] else 'no'} | {same} | {row['tokens_per_target_pass']:.2f} | "
                     f"{100 * row['acceptance_rate']:.1f} % | {row['mean_accepted_per_round']:.2f} | {times} | "
                     f"{row['speedup']:.2f}x | {row['speedup_median_prompt']:.2f}x | {row['cpu_time_speedup']:.2f}x |")
    gamma = config["gamma"]
    drafted = [(name, row) for name, row in report["variants"].items() if name != "plain"]
    lines += ["", "Acceptance by draft position (share of the rounds reaching position i, all before it accepted, that accept it):", "",
              "| variant | " + " | ".join(f"pos {i + 1}" for i in range(gamma)) + " |", "|---|" + "---:|" * gamma]
    lines += [f"| {name} | " + " | ".join(f"{100 * a:.1f} %" for a in row["acceptance_by_position"]) + " |" for name, row in drafted]
    lines += ["", "Rounds by draft tokens accepted:", "", "| variant | " + " | ".join(str(n) for n in range(gamma + 1)) + " |",
              "|---|" + "---:|" * (gamma + 1)]
    lines += [f"| {name} | " + " | ".join(str(count) for count in row["accepted_histogram"]) + " |" for name, row in drafted]
    if report["knowledge_cache_build_ms"] is not None:
        lines += ["", f"Knowledge KV cache build (per prompt, before the timed call): {report['knowledge_cache_build_ms']:.1f} ms."]
    return "\n".join(lines) + "\n"


def plot_text_report(report: dict[str, Any], path: str | Path) -> None:
    """Acceptance by draft position for every draft, with its wall-time ratio in the legend (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in report["variants"].items():
        if name != "plain":
            positions = range(1, len(row["acceptance_by_position"]) + 1)
            ax.plot(positions, row["acceptance_by_position"], marker="o", label=f"{name} ({row['speedup']:.2f}x)")
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance")
    ax.set_ylim(0, 1)
    ax.set_title(f"bench-text, {report['hardware']['cpu']}, {report['hardware']['date']}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def json_line(report: dict[str, Any]) -> str:
    """The one-line JSON summary printed last."""
    keys = ("speedup", "speedup_median_prompt", "cpu_time_speedup", "tokens_per_target_pass", "acceptance_rate", "identical_outputs")
    return json.dumps({"bench": "text", **{name: {k: row[k] for k in keys if k in row} for name, row in report["variants"].items()}})
