"""The `rsd` command line: every command, each a thin click layer over a library function with the same options.

Heavy modules are imported inside the commands, so `rsd --help` stays fast. `export-draft` and `bench-latency`
are also console scripts of their own (`export_draft_main`, `bench_latency_main`).

Usage:
    rsd --help
    rsd presets tiny
    rsd demo --quick --out runs/quick
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from rsd.config import TrainConfig, to_dict
from rsd.errors import RsdError
from rsd.presets import get_preset


class RsdGroup(click.Group):
    """A click group that prints rsd's own errors as one clear line and exits with status 1."""

    def invoke(self, ctx: click.Context) -> object:
        """Run the command; an RsdError becomes a ClickException carrying its message."""
        try:
            return super().invoke(ctx)
        except RsdError as error:
            raise click.ClickException(f"{type(error).__name__}: {error}") from error


@click.group(cls=RsdGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def main(verbose: bool) -> None:
    """rsd: early-exit speculative drafting for OpenVLA-class robot policies."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("name")
def presets(name: str) -> None:
    """Print the configs of preset NAME (tiny, openvla-7b) as JSON."""
    preset = get_preset(name)
    click.echo(json.dumps({"name": preset.name, "model": to_dict(preset.model), "draft": to_dict(preset.draft())}, indent=2))


def _train_config(preset: str, stage: str, epochs: int | None, batch_size: int | None, lr: float | None, seed: int | None) -> TrainConfig:
    """The preset's training defaults for `stage`, with the options the user gave replacing them."""
    base = getattr(get_preset(preset), f"{stage}_train")
    changes = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}.items() if v is not None}
    return dataclasses.replace(base, **changes)


def _train_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """The optimisation options shared by the training commands (defaults from the preset)."""
    for option in reversed(
        [
            click.option("--preset", default="tiny", show_default=True, help="Preset whose configs and defaults are used."),
            click.option("--epochs", type=int, default=None, help="Epochs (default: the preset's)."),
            click.option("--batch-size", type=int, default=None, help="Batch size (default: the preset's)."),
            click.option("--lr", type=float, default=None, help="Peak learning rate (default: the preset's)."),
            click.option("--seed", type=int, default=None, help="Seed of the split, initialisation and shuffling."),
        ]
    ):
        function = option(function)
    return function


@main.command("synthetic-actions")
@click.option("--episodes", default=200, show_default=True, help="Episodes to generate.")
@click.option("--seed", default=0, show_default=True, help="Seed of the generator.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="NPZ file to write (actions, episode_ends, episode_ids).")
def synthetic_actions_command(episodes: int, seed: int, out: str) -> None:
    """Write the documented smooth synthetic action set (for checking the tokenizer)."""
    from rsd.data.actions import write_action_episodes
    from rsd.data.synthetic import synthetic_action_episodes

    write_action_episodes(out, synthetic_action_episodes(episodes, seed=seed))
    click.echo(json.dumps({"episodes": episodes, "out": out}))


@main.command("train-tokenizer")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Actions: LIBERO-layout HDF5 or NPZ.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Tokenizer folder to write.")
@_train_options
def train_tokenizer_command(data: str, out: str, preset: str, epochs: int | None, batch_size: int | None, lr: float | None,
                            seed: int | None) -> None:
    """Train the RFSQ action tokenizer; write tokenizer.safetensors/.json and report.json/.md."""
    from rsd.training.tokenizer import train_tokenizer_from_file

    report = train_tokenizer_from_file(data, out, preset, _train_config(preset, "tokenizer", epochs, batch_size, lr, seed))
    click.echo(json.dumps({"val_mse_by_layers": report["val_mse_by_layers"], "train_seconds": report["train_seconds"]}))


@main.command("train-policy")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Demonstrations (LIBERO HDF5 layout).")
@click.option("--tokenizer", required=True, type=click.Path(exists=True, file_okay=False), help="Trained tokenizer folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Policy folder to write.")
@click.option("--freeze-backbone", is_flag=True, help="Train only the RFSQ head on a frozen backbone.")
@_train_options
def train_policy_command(data: str, tokenizer: str, out: str, freeze_backbone: bool, preset: str, epochs: int | None,
                         batch_size: int | None, lr: float | None, seed: int | None) -> None:
    """Train PrismaticVLA + RFSQ head by behaviour cloning on RFSQ tokens."""
    from rsd.training.policy import train_policy

    summary = train_policy(data, tokenizer, out, preset, _train_config(preset, "policy", epochs, batch_size, lr, seed), freeze_backbone)
    click.echo(json.dumps({"best": summary["best"], "fingerprint": summary["fingerprint"]}))


@main.command("collect-features")
@click.option("--policy", required=True, type=click.Path(exists=True, file_okay=False), help="Policy folder (the frozen main model).")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Demonstrations (LIBERO HDF5 layout).")
@click.option("--exit-layer", required=True, type=int, help="Layer k whose query hidden state the draft reads.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Features folder (resumed if it exists).")
@click.option("--shard-size", default=2048, show_default=True, help="Frames per shard.")
@click.option("--batch-size", default=64, show_default=True, help="Frames per forward pass.")
def collect_features_command(policy: str, data: str, exit_layer: int, out: str, shard_size: int, batch_size: int) -> None:
    """Store exit-layer hidden states, main logits and tokens for every frame (sharded, resumable)."""
    from rsd.training.features import collect_features

    click.echo(json.dumps(collect_features(policy, data, exit_layer, out, shard_size, batch_size)))


@main.command("train-draft")
@click.option("--features", required=True, type=click.Path(exists=True, file_okay=False), help="Features folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Draft folder to write.")
@click.option("--targets", type=click.Choice(["main", "ground_truth"]), default="main", show_default=True,
              help="Distil the main model's tokens, or fit the ground-truth tokens.")
@click.option("--kl-weight", default=0.8, show_default=True, help="Weight of KL(main || draft).")
@click.option("--accept-weight", default=0.3, show_default=True, help="Weight of the acceptance (total-variation) loss.")
@_train_options
def train_draft_command(features: str, out: str, targets: str, kl_weight: float, accept_weight: float, preset: str,
                        epochs: int | None, batch_size: int | None, lr: float | None, seed: int | None) -> None:
    """Train the draft's input projection and head on collected features."""
    from rsd.training.draft import train_draft

    summary = train_draft(features, out, preset, _train_config(preset, "draft", epochs, batch_size, lr, seed), targets, kl_weight, accept_weight)
    click.echo(json.dumps({"best": summary["best"], "parameters": summary["parameters"]}))


@main.command()
@click.option("--draft", required=True, type=click.Path(exists=True, file_okay=False), help="Trained draft folder.")
@click.option("--features", required=True, type=click.Path(exists=True, file_okay=False), help="Features folder the draft was trained on.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="calibration.json to write (default: DRAFT/calibration.json).")
@click.option("--eps", default=0.05, show_default=True, help="Chunk error (max-abs, normalised units) that counts as a failure.")
@click.option("--target-risk", default=0.02, show_default=True, help="Highest acceptable share of failing accepted chunks.")
@click.option("--statistic", type=click.Choice(["auto", "mean", "min"]), default="auto", show_default=True, help="Gate statistic.")
def calibrate(draft: str, features: str, out: str | None, eps: float, target_risk: float, statistic: str) -> None:
    """Measure coverage/risk over tau on held-out episodes and pick tau for a target risk."""
    from rsd.training.calibrate import calibrate as run_calibration

    report = run_calibration(draft, features, out or str(Path(draft) / "calibration.json"), eps, target_risk, statistic)
    click.echo(json.dumps({k: report[k] for k in ("tau", "gate_statistic", "test")}))


def _int_list(text: str | None) -> list[int] | None:
    """Parse "8,16,24" into [8, 16, 24]."""
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise click.BadParameter(f"expected comma-separated integers such as 8,16,24, got {text!r}") from error


@main.command("bench-latency")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None, help="Exported bundle (with --main).")
@click.option("--main", "main_dir", type=click.Path(exists=True, file_okay=False), default=None, help="Policy folder the bundle was made for.")
@click.option("--preset", default=None, help="Preset to build with random weights (with --random-weights), e.g. openvla-7b.")
@click.option("--random-weights", is_flag=True, help="Random weights in the preset's shapes: latency only.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp32 on cpu, fp16 on cuda).")
@click.option("--iters", default=50, show_default=True, help="Timed iterations per stage.")
@click.option("--warmup", default=10, show_default=True, help="Untimed warm-up iterations per stage (excluded).")
@click.option("--exit-layers", default=None, help="Comma-separated exit layers, e.g. 8,16,24 (default: N/4, N/2, 3N/4 or the bundle's).")
@click.option("--acceptance", type=float, default=None, help="Acceptance rate for the speed-up when no observations are replayed.")
@click.option("--observations", type=click.Path(exists=True, dir_okay=False), default=None, help="Demo file whose frames are replayed.")
@click.option("--tau", type=float, default=None, help="Gate threshold for the replay (default: the bundle's).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the full report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write the latency-vs-acceptance plot (PNG).")
def bench_latency_command(bundle: str | None, main_dir: str | None, preset: str | None, random_weights: bool, device: str | None,
                          dtype: str | None, iters: int, warmup: int, exit_layers: str | None, acceptance: float | None,
                          observations: str | None, tau: float | None, json_path: str | None, plot_path: str | None) -> None:
    """Time draft vs main stages and the speculative policy vs the baseline."""
    from rsd.bench.latency import run_bench_latency
    from rsd.bench.report import json_line

    report = run_bench_latency(bundle, main_dir, preset, random_weights, device, dtype, iters, warmup, _int_list(exit_layers),
                               acceptance, observations, tau=tau, json_path=json_path, plot_path=plot_path)
    click.echo(report["markdown"])
    click.echo(json_line(report))


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False), help="Folder for every artifact and report.md.")
@click.option("--quick", is_flag=True, help="A smaller run (under a minute on 2 cores) that exercises every step.")
def demo(out: str, quick: bool) -> None:
    """Run the whole pipeline on the CPU with built-in data and write OUT/report.md."""
    from rsd.demo import run_demo

    run_demo(out, quick)


@main.command("generate-demos")
@click.option("--env", "env_name", default="tabletop", show_default=True, help="tabletop or robosuite:<Task>.")
@click.option("--episodes", default=200, show_default=True, help="Expert episodes to run (failures are dropped).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HDF5 file to write (LIBERO layout).")
@click.option("--seed", default=0, show_default=True, help="First seed (episodes use seed .. seed+episodes-1).")
@click.option("--image-size", default=64, show_default=True, help="Side of the rendered camera frames.")
@click.option("--task-family", default=None, type=click.Choice(["any", "pick_place", "next_to"]),
              help="Tabletop task family (default: the world's own, both families).")
def generate_demos_command(env_name: str, episodes: int, out: str, seed: int, image_size: int, task_family: str | None) -> None:
    """Write scripted-expert demonstrations to an HDF5 file."""
    from rsd.envs.demos import generate_demos

    options = {} if task_family is None else {"task_family": task_family}
    summary = generate_demos(env_name, episodes, out, seed=seed, image_size=image_size, **options)
    click.echo(
        f"wrote {summary['episodes']} episodes ({summary['failed']} failed, dropped) to {summary['out']}: "
        f"{summary['steps']} steps in {summary['seconds']:.1f} s ({summary['steps_per_second']:.0f} steps/s)"
    )


@main.command("eval")
@click.option("--policy", required=True, type=click.Path(exists=True, file_okay=False), help="Policy folder (main model).")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None, help="Bundle: also run SpeculativePolicy.")
@click.option("--env", "env_name", default="tabletop", show_default=True, help="Environment, e.g. tabletop or robosuite:Lift.")
@click.option("--episodes", default=50, show_default=True, help="Episodes per policy (seeds seed .. seed+episodes-1).")
@click.option("--seed", default=10_000, show_default=True, help="First seed.")
@click.option("--video", type=click.Path(file_okay=False), default=None, help="Folder for one video per episode.")
@click.option("--video-format", default="gif", show_default=True, type=click.Choice(["gif", "mp4"]), help="mp4 needs imageio-ffmpeg.")
@click.option("--device", default=None, help="cpu or cuda (default: resolved and logged).")
@click.option("--engine", default="auto", show_default=True, help="Bundle engine: auto, tensorrt, onnx, torchscript, torch.")
@click.option("--tau", type=float, default=None, help="Gate threshold (default: the bundle's).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the reports as JSON.")
@click.option("--image-size", type=int, default=None, help="Camera frame side given to the policy (default: the environment's).")
@click.option("--libero-assets", type=click.Path(exists=True, file_okay=False), default=None,
              help="LIBERO scene assets folder (libero:* environments; default: LIBERO's config).")
def eval_command(policy: str, bundle: str | None, env_name: str, episodes: int, seed: int, video: str | None, video_format: str,
                 device: str | None, engine: str, tau: float | None, json_path: str | None, image_size: int | None,
                 libero_assets: str | None) -> None:
    """Closed-loop evaluation of MainOnlyPolicy (and SpeculativePolicy with --bundle) on the same seeds."""
    from rsd.envs.evaluate import compare_policies, format_comparison
    from rsd.runtime.policy import load_main

    if libero_assets and not env_name.startswith("libero:"):
        raise click.BadParameter(f"--libero-assets applies to libero:* environments, got --env {env_name}.")
    env_kwargs = {k: v for k, v in {"image_size": image_size, "assets": libero_assets}.items() if v is not None}
    reports = compare_policies(load_main(policy, device, None), env_name, list(range(seed, seed + episodes)), bundle=bundle,
                               engine=engine, taus={"speculative": tau}, video_dir=video, video_format=video_format,
                               env_kwargs=env_kwargs)
    for name, report in reports.items():
        click.echo(f"## {name}\n\n{report.to_markdown()}")
    if line := format_comparison(reports):
        click.echo(line)
    if json_path:
        Path(json_path).write_text(json.dumps({k: v.to_json() for k, v in reports.items()}, indent=2) + "\n")


@main.command("export-draft")
@click.option("--draft", required=True, type=click.Path(exists=True, file_okay=False), help="Draft folder (rsd train-draft).")
@click.option("--tokenizer", required=True, type=click.Path(exists=True, file_okay=False), help="Tokenizer folder (rsd train-tokenizer).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False), default=None,
              help="calibration.json (rsd calibrate); without it tau = inf (never accept).")
@click.option("--features", type=click.Path(exists=True, file_okay=False), default=None,
              help="Features folder: parity on the draft's held-out episodes (default: seeded random rows).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write (replaces an earlier bundle).")
@click.option("--formats", default="onnx,torchscript", show_default=True, help="Comma-separated: onnx, torchscript, tensorrt.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]), help="Draft engine precision (decoders stay fp32).")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--device", default="cpu", show_default=True, help="Device to build and check the engines on (cpu or cuda).")
@click.option("--dry-run", is_flag=True, help="Plan TensorRT engines in the manifest (built: false) without building them.")
def export_draft_command(draft: str, tokenizer: str, calibration: str | None, features: str | None, out: str, formats: str,
                         precision: str, opset: int | None, device: str, dry_run: bool) -> None:
    """Compile the draft and decoders, check parity against PyTorch, and write a bundle."""
    from rsd.bundle import parity_text
    from rsd.export import export_draft

    report = export_draft(draft, tokenizer, out, formats=formats.split(","), precision=precision, calibration=calibration,
                          features=features, dry_run=dry_run, opset=opset, device=device)
    for engine in report["engines"]:
        seconds = "-" if engine["export_seconds"] is None else f"{engine['export_seconds']:.2f} s"
        click.echo(f"{engine['name']:<12} {engine['format']:<12} {engine['precision']:<5} {seconds:>8} "
                   f"{engine['bytes'] / 1e6:8.2f} MB  {parity_text(engine)}")
    click.echo(f"wrote {report['out']} in {report['seconds']:.1f} s" + ("" if report["calibrated"] else " (not calibrated: tau = inf)"))


@main.command("inspect")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
def inspect_command(bundle: str) -> None:
    """Print a bundle's manifest and re-verify every file hash (non-zero exit on a mismatch)."""
    from rsd.bundle import format_manifest, read_manifest, verify_bundle

    click.echo(format_manifest(read_manifest(bundle)))
    verify_bundle(bundle)
    click.echo("\nall file hashes verified")


@main.command("inspect-main")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def inspect_main_command(path: str) -> None:
    """Print variant, dims, dtype and statistics keys of an OpenVLA/OFT folder or an rsd policy folder PATH as JSON."""
    from rsd.models.openvla import inspect_main_folder

    click.echo(json.dumps(inspect_main_folder(path), indent=2))


def _layer_list(text: str) -> tuple[int, ...]:
    """Parse "0,5,11" into (0, 5, 11)."""
    parsed = _int_list(text)
    if not parsed:
        raise click.BadParameter(f"expected comma-separated layer indices such as 0,5,11,16,22,27, got {text!r}")
    return tuple(parsed)


@main.command("train-text-lm")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the model, tokenizer and metrics.")
@click.option("--preset", default="qwen3-tiny", show_default=True, help="Text LM preset: qwen3-tiny or qwen3-test.")
@click.option("--steps", default=3000, show_default=True, help="Optimiser steps (the cosine schedule's length).")
@click.option("--max-seconds", default=900.0, show_default=True, help="Stop after this much training time (0: all steps).")
@click.option("--batch-size", default=4, show_default=True, help="Windows per step.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per window.")
@click.option("--lr", default=2e-3, show_default=True, help="Peak learning rate.")
@click.option("--resume", type=click.Path(exists=True, file_okay=False), default=None, help="Continue training the LM saved here.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available; fp32 either way).")
@click.option("--threads", default=1, show_default=True, help="torch threads.")
def train_text_lm_command(out: str, preset: str, steps: int, max_seconds: float, batch_size: int, seq_len: int, lr: float,
                          resume: str | None, device: str | None, threads: int) -> None:
    """Train the tiny Qwen3 LM (and its BPE) on the Python standard library's sources."""
    import torch

    from rsd.training.text_lm import TextTrainConfig, train_text_lm

    torch.set_num_threads(threads)
    train = TextTrainConfig(steps=steps, max_seconds=max_seconds, batch_size=batch_size, seq_len=seq_len, lr=lr)
    metrics = train_text_lm(out, preset, train, resume=resume, device=device)
    click.echo(json.dumps({k: metrics[k] for k in ("steps", "tokens_seen", "final_train_loss", "val_loss", "seconds", "fingerprint")}))


@main.command("train-layer-draft")
@click.option("--target", required=True, type=click.Path(exists=True, file_okay=False), help="Text LM folder or AR policy folder.")
@click.option("--layers", required=True, help="Target layers the draft runs, e.g. 0,5,11,16,22,27.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Draft folder to write.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), default=None, help="Demonstrations (AR policy targets only).")
@click.option("--knowledge", is_flag=True, help="Add the gated cross-attention over a knowledge cache (text LM targets).")
@click.option("--transition-size", default=64, show_default=True, help="Bottleneck width of each transition (0: none).")
@click.option("--tune-layers", is_flag=True, help="Fine-tune copies of the sampled layers (default: share the target's, frozen).")
@click.option("--steps", default=300, show_default=True, help="Optimiser steps.")
@click.option("--batch-size", default=0, show_default=True, help="Windows or frames per step (0: 4 windows for text, 32 frames for the VLA).")
@click.option("--lr", default=3e-3, show_default=True, help="Peak learning rate.")
@click.option("--kl-weight", default=0.8, show_default=True, help="Weight of KL(target || draft).")
@click.option("--accept-weight", default=0.3, show_default=True, help="Weight of the rejection probability.")
@click.option("--seq-len", default=256, show_default=True, help="Text: tokens per training sequence.")
@click.option("--self-distill", default=0, show_default=True, help="Text: train on this many sequences the target writes (0: corpus).")
@click.option("--prompt-tokens", default=64, show_default=True, help="Text self-distillation: corpus tokens before the target writes.")
@click.option("--memory-tokens", default=512, show_default=True, help="Knowledge drafts: memory tokens per sequence.")
@click.option("--max-seconds", default=0.0, show_default=True, help="Stop after this much training time (0: all steps).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available; fp32 either way).")
@click.option("--threads", default=1, show_default=True, help="torch threads.")
def train_layer_draft_command(target: str, layers: str, out: str, data: str | None, knowledge: bool, transition_size: int, tune_layers: bool,
                              steps: int, batch_size: int, lr: float, kl_weight: float, accept_weight: float, seq_len: int, self_distill: int,
                              prompt_tokens: int, memory_tokens: int, max_seconds: float, device: str | None, threads: int) -> None:
    """Distil a layer-sampled draft (KL 0.8 + acceptance 0.3) from a text LM or an AR-mode VLA policy."""
    import torch

    from rsd.training.layer_draft import DraftTrainConfig, train_layer_draft

    torch.set_num_threads(threads)
    train = DraftTrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, kl_weight=kl_weight, accept_weight=accept_weight,
                             memory_tokens=memory_tokens, self_distill=self_distill, prompt_tokens=prompt_tokens, max_seconds=max_seconds)
    summary = train_layer_draft(target, out, _layer_list(layers), train, transition_size, knowledge, tune_layers, data, device)
    click.echo(json.dumps({k: summary[k] for k in ("val_before", "val", "steps", "seconds")}))


@main.command("train-ar-policy")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Demonstrations (LIBERO HDF5 layout).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="AR policy folder to write.")
@_train_options
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available; fp32 either way).")
@click.option("--threads", default=1, show_default=True, help="torch threads.")
def train_ar_policy_command(data: str, out: str, preset: str, epochs: int | None, batch_size: int | None, lr: float | None, seed: int | None,
                            device: str | None, threads: int) -> None:
    """Train PrismaticVLA in OpenVLA's autoregressive action mode (256 bins, 7 tokens per step)."""
    import torch

    from rsd.training.ar_policy import train_ar_policy

    torch.set_num_threads(threads)
    summary = train_ar_policy(data, out, preset, _train_config(preset, "policy", epochs, batch_size, lr, seed), device=device)
    click.echo(json.dumps({"best": summary["best"], "fingerprint": summary["fingerprint"]}))


@main.command("bench-text")
@click.option("--lm", "lm_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Text LM folder (train-text-lm).")
@click.option("--draft", "drafts", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="Layer-draft folder (repeat for several).")
@click.option("--prompts", default=8, show_default=True, help="Timed prompts (plus one warm-up).")
@click.option("--prompt-tokens", default=64, show_default=True, help="Tokens per prompt.")
@click.option("--new-tokens", default=128, show_default=True, help="Tokens generated per prompt.")
@click.option("--gamma", default=5, show_default=True, help="Draft tokens per round.")
@click.option("--memory-tokens", default=512, show_default=True, help="Knowledge drafts: tokens of the prompt's file in the cache.")
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy (outputs checked against plain decoding); > 0: sampled.")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus of sampled decoding.")
@click.option("--seed", default=0, show_default=True, help="Picks the prompt windows and seeds sampling.")
@click.option("--repeats", default=1, show_default=True, help="Timed runs per prompt and variant; the fastest counts.")
@click.option("--threads", default=1, show_default=True, help="torch threads.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the full report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write acceptance by draft position (PNG).")
def bench_text_command(lm_dir: str, drafts: tuple[str, ...], prompts: int, prompt_tokens: int, new_tokens: int, gamma: int,
                       memory_tokens: int, temperature: float, top_p: float, seed: int, repeats: int, threads: int, json_path: str | None,
                       plot_path: str | None) -> None:
    """Plain vs speculative decoding of the tiny Qwen3 LM: exactness, tokens per target pass, acceptance, wall-time ratio."""
    import torch

    from rsd.bench.text import TextBenchConfig, json_line, plot_text_report, run_bench_text

    torch.set_num_threads(threads)
    config = TextBenchConfig(prompts=prompts, prompt_tokens=prompt_tokens, new_tokens=new_tokens, gamma=gamma, memory_tokens=memory_tokens,
                             temperature=temperature, top_p=top_p, seed=seed, repeats=repeats)
    report = run_bench_text(lm_dir, list(drafts), config, json_path)
    if plot_path:
        plot_text_report(report, plot_path)
    click.echo(report["markdown"])
    click.echo(json_line(report))


@main.command("bench-ar")
@click.option("--policy", required=True, type=click.Path(exists=True, file_okay=False), help="AR policy folder (train-ar-policy).")
@click.option("--draft", "drafts", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="Layer-draft folder (repeat for several).")
@click.option("--episodes", default=20, show_default=True, help="Seeds per variant (plus one warm-up seed).")
@click.option("--seed", default=10_000, show_default=True, help="First seed.")
@click.option("--gamma", default=3, show_default=True, help="Draft tokens per round.")
@click.option("--threads", default=1, show_default=True, help="torch threads.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the full report as JSON.")
def bench_ar_command(policy: str, drafts: tuple[str, ...], episodes: int, seed: int, gamma: int, threads: int, json_path: str | None) -> None:
    """Closed-loop plain vs speculative AR action decoding on the same seeds: outcomes, actions, latency ratio."""
    import torch

    from rsd.bench.ar import json_line, run_bench_ar

    torch.set_num_threads(threads)
    report = run_bench_ar(policy, list(drafts), episodes, seed, gamma, json_path=json_path)
    click.echo(report["markdown"])
    click.echo(json_line(report))


def run_standalone(command: click.Command) -> None:
    """Run one command of the group as its own console script, with the group's logging and error handling."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        command.main(standalone_mode=False)
    except click.exceptions.Abort:
        raise SystemExit(1) from None
    except click.ClickException as error:
        error.show()
        raise SystemExit(error.exit_code) from error
    except RsdError as error:
        click.echo(f"Error: {type(error).__name__}: {error}", err=True)
        raise SystemExit(1) from error


def bench_latency_main() -> None:
    """Console entry point `bench-latency`: the same command as `rsd bench-latency`."""
    run_standalone(bench_latency_command)


def export_draft_main() -> None:
    """Console entry point `export-draft`: the same command as `rsd export-draft`."""
    run_standalone(export_draft_command)
