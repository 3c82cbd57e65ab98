"""The `rsd` command line: every command, each a thin click layer over a library function with the same options.

Heavy modules are imported inside the commands, so `rsd --help` stays fast. `export-draft` and `bench-latency`
are also console scripts of their own (`export_draft_main`, `bench_latency_main`).

Every numeric option has a click range, so a zero batch size or iteration count is refused before anything runs.
An error rsd raises on purpose (`rsd.errors.RsdError`) is printed as one line and exits with status 1; any other
exception is a bug in rsd: it is printed as one line asking for a report and exits with status 70
(`EXIT_BUG`), and `--debug` shows its traceback instead. Commands that write an artifact refuse an existing one
unless given `--overwrite` (`rsd.io.staged_dir`).

Usage:
    rsd --help
    rsd presets tiny
    rsd demo --quick --out runs/quick
    rsd train-policy --data data/libero_lerobot --camera image --image-size 64 --tokenizer runs/lr/tokenizer --out runs/lr/policy
    rsd convert --to lerobot --data runs/demo/demos.hdf5 --out runs/demo/lerobot
    rsd generate-demos --env libero:libero_spatial --tasks 0,1 --episodes 30 --workers 2 --out runs/libero/demos.hdf5
    rsd check-expert --env libero:libero_spatial --trials 50 --workers 2
    rsd eval --policy runs/libero/policy --env libero:libero_spatial/0 --image-size 64 --episodes 10 --workers 2
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from rsd.config import TrainConfig, to_dict
from rsd.errors import RsdError
from rsd.presets import get_preset

if TYPE_CHECKING:
    from rsd.data.source import DataSource

EXIT_BUG = 70  # exit status of an unexpected exception (sysexits' EX_SOFTWARE)
POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)
POSITIVE_FLOAT = click.FloatRange(min=0.0, min_open=True)
NON_NEGATIVE_FLOAT = click.FloatRange(min=0.0)
LAYERS_HELP = ("Coarse RFSQ layers the gate's confidence reads, coarsest first (default: all the draft predicts; 1 reads the "
               "coarsest only, whose tokens set most of the action).")
MAX_STEPS_HELP = ("Prefix mode: most leading steps accepted, i.e. the steps the policy executes per chunk (its --replan-every); "
                  "risk is then judged on those steps only (default: the whole chunk).")
OPEN_UNIT = click.FloatRange(0.0, 1.0, min_open=True, max_open=True)
UNIT = click.FloatRange(0.0, 1.0)
IMAGE_SIDE = click.IntRange(min=8)


class TauType(click.ParamType):
    """A gate threshold: a float in [0, 1] (the draft's confidence is a probability) or inf (never accept)."""

    name = "tau"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        """`value` as a float in [0, 1] or inf."""
        try:
            tau = float(value)
        except (TypeError, ValueError):
            self.fail(f"expected a number in [0, 1] or inf, got {value!r}.", param, ctx)
        if not (0.0 <= tau <= 1.0 or tau == math.inf):
            self.fail(f"expected a number in [0, 1] or inf, got {value!r}.", param, ctx)
        return tau


TAU = TauType()


def exit_on_error(error: Exception, debug: bool) -> NoReturn:
    """End the command for an exception that reached the command line: one line and an exit status (a bug re-raised under `debug`)."""
    if isinstance(error, RsdError):
        click.echo(f"Error: {type(error).__name__}: {error}", err=True)
        raise SystemExit(1) from error
    if debug:
        raise error
    click.echo(f"Error: internal error, a bug in rsd ({type(error).__name__}: {error}). Re-run with --debug for the traceback "
               "and please report it.", err=True)
    raise SystemExit(EXIT_BUG) from error


class RsdGroup(click.Group):
    """A click group that prints rsd's own errors as one clear line (status 1) and a bug as one line (status 70)."""

    def invoke(self, ctx: click.Context) -> object:
        """Run the command; click's own exceptions pass, any other ends it through `exit_on_error`."""
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except Exception as error:  # the one place every failure becomes an exit status
            exit_on_error(error, bool(ctx.params.get("debug")))


@click.group(cls=RsdGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error (a bug) instead of one line.")
def main(verbose: bool, debug: bool) -> None:
    """rsd: early-exit speculative drafting for OpenVLA-class robot policies."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("name")
def presets(name: str) -> None:
    """Print the configs of preset NAME (tiny, openvla-7b) as JSON."""
    preset = get_preset(name)
    click.echo(json.dumps({"name": preset.name, "model": to_dict(preset.model), "draft": to_dict(preset.draft())}, indent=2))


def _train_config(preset: str, stage: str, epochs: int | None, batch_size: int | None, lr: float | None, warmup: float | None, seed: int | None) -> TrainConfig:
    """The preset's training defaults for `stage`, with the options the user gave replacing them."""
    base = getattr(get_preset(preset), f"{stage}_train")
    changes = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr, "warmup": warmup, "seed": seed}.items() if v is not None}
    return dataclasses.replace(base, **changes)


OVERWRITE = click.option("--overwrite", is_flag=True,
                         help="Replace an existing artifact of the same kind at --out (the old one stays intact until the new one is complete).")


DATA_OPTIONS = ("data_config", "cameras", "proprio_keys", "action_key", "instruction", "image_size", "image_convention", "stats")


def _data_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """How to read a dataset (`rsd.data.source.DataSource`): the options named in DATA_OPTIONS, one set for every command."""
    for option in reversed(
        [
            click.option("--data-config", type=click.Path(exists=True, dir_okay=False), default=None,
                         help="Per-dataset JSON with any of cameras, proprio_keys, image_size, image_convention, instruction, "
                         "action_key, statistics (the options below win)."),
            click.option("--camera", "cameras", multiple=True, help="Camera to load, repeat for more (HDF5: agentview for "
                         "obs/agentview_rgb or _image; LeRobot: key or name). Default: every camera."),
            click.option("--proprio-keys", default=None, help="Comma-separated keys concatenated into proprio, or 'none' (default: "
                         "LIBERO's ee_pos,ee_ori,gripper_states when the file has them; LeRobot: observation.state)."),
            click.option("--action-key", default=None, help="Action key (default: action for LeRobot, actions for HDF5)."),
            click.option("--instruction", default=None, help="Instruction for every episode (default: the dataset's own; "
                         "needed for files without one, e.g. robomimic's)."),
            click.option("--image-size", type=IMAGE_SIDE, default=None, help="Resize frames to this square side "
                         "(default: the model's image size where a model reads them, else as stored)."),
            click.option("--image-convention", type=click.Choice(["opengl", "opencv"]), default=None,
                         help="opengl: frames stored upside down (robosuite; rotated 180° on reading), opencv: upright (default: "
                         "the HDF5 file's macros_image_convention, a file without one is refused; LeRobot: upright)."),
            click.option("--stats", type=click.Choice(["dataset", "train"]), default=None,
                         help="dataset (default): the dataset's own q01/q99 when it has them; train: from the training episodes."),
        ]
    ):
        function = option(function)
    return function


def _data_source(data: str, data_config: str | None, cameras: tuple[str, ...], proprio_keys: str | None, action_key: str | None,
                 instruction: str | None, image_size: int | None, image_convention: str | None, stats: str | None) -> DataSource:
    """The DataSource the data options describe: the options first, then --data-config, then DataSource's defaults."""
    from rsd.data.source import DataSource

    keys = None if proprio_keys is None else () if proprio_keys.strip().lower() == "none" else tuple(
        k.strip() for k in proprio_keys.split(",") if k.strip())
    choices = {"cameras": cameras or None, "proprio_keys": keys, "action_key": action_key, "instruction": instruction,
               "image_size": image_size, "image_convention": image_convention, "statistics": stats}
    if data_config is not None:
        return DataSource.from_config(data, data_config, **choices)
    return DataSource(data, **{k: v for k, v in choices.items() if v is not None})


def data_source_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """`--data` and the data options (`_data_options`); the command receives them as one `data: DataSource`."""

    @functools.wraps(function)
    def wrapper(*args: Any, data: str, **kwargs: Any) -> Any:
        options = {name: kwargs.pop(name) for name in DATA_OPTIONS}
        return function(*args, data=_data_source(data, **options), **kwargs)

    wrapper = _data_options(wrapper)
    return click.option("--data", required=True, type=click.Path(exists=True),
                        help="LeRobotDataset folder (v3.0 or v2.x) or robomimic/LIBERO HDF5 file.")(wrapper)


def _at_image_size(source: DataSource, size: int) -> DataSource:
    """`source` resizing frames to `size` (the model's image size) unless it names a size of its own."""
    return source if source.image_size is not None else dataclasses.replace(source, image_size=size)


def _model_image_size(policy: str) -> int:
    """The image side of the policy folder's model (from its vla/model.json, without loading weights)."""
    from rsd.config import VLAConfig, from_dict
    from rsd.io import read_manifest

    return from_dict(VLAConfig, read_manifest(Path(policy) / "vla", "model", kind="vla")["config"]).image_size


def _train_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """The optimisation options shared by the training commands (defaults from the preset)."""
    for option in reversed(
        [
            click.option("--preset", default="tiny", show_default=True, help="Preset whose configs and defaults are used."),
            click.option("--epochs", type=POSITIVE, default=None, help="Epochs (default: the preset's)."),
            click.option("--batch-size", type=POSITIVE, default=None, help="Batch size (default: the preset's)."),
            click.option("--lr", type=POSITIVE_FLOAT, default=None, help="Peak learning rate (default: the preset's)."),
            click.option("--warmup", type=click.FloatRange(0.0, 1.0, max_open=True), default=None,
                         help="Share of the steps warming up to the peak rate (default: the preset's)."),
            click.option("--seed", type=NON_NEGATIVE, default=None, help="Seed of the split, initialisation and shuffling."),
            OVERWRITE,
        ]
    ):
        function = option(function)
    return function


@main.command("synthetic-actions")
@click.option("--episodes", type=POSITIVE, default=200, show_default=True, help="Episodes to generate.")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True, help="Seed of the generator.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="NPZ file to write (actions, episode_ends, episode_ids).")
@OVERWRITE
def synthetic_actions_command(episodes: int, seed: int, out: str, overwrite: bool) -> None:
    """Write the documented smooth synthetic action set (for checking the tokenizer)."""
    from rsd.data.actions import write_action_episodes
    from rsd.data.synthetic import synthetic_action_episodes
    from rsd.io import refuse_existing_file

    refuse_existing_file(out, overwrite)
    write_action_episodes(out, synthetic_action_episodes(episodes, seed=seed))
    click.echo(json.dumps({"episodes": episodes, "out": out}))


@main.command("train-tokenizer")
@data_source_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Tokenizer folder to write.")
@_train_options
def train_tokenizer_command(data: DataSource, out: str, preset: str, epochs: int | None, batch_size: int | None, lr: float | None,
                            warmup: float | None, seed: int | None, overwrite: bool) -> None:
    """Train the RFSQ action tokenizer; write tokenizer.safetensors/.json and report.json/.md."""
    from rsd.distributed import session
    from rsd.training.tokenizer import train_tokenizer_from_file

    with session() as world:
        report = train_tokenizer_from_file(data, out, preset, _train_config(preset, "tokenizer", epochs, batch_size, lr, warmup, seed),
                                           overwrite=overwrite)
    if world.is_main:
        click.echo(json.dumps({"val_mse_by_layers": report["val_mse_by_layers"], "train_seconds": report["train_seconds"]}))


@main.command("train-policy")
@data_source_options
@click.option("--tokenizer", required=True, type=click.Path(exists=True, file_okay=False), help="Trained tokenizer folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Policy folder to write.")
@click.option("--freeze-backbone", is_flag=True, help="Train only the RFSQ head on a frozen backbone.")
@click.option("--select-by", type=click.Choice(["rollouts", "val_l1"]), default=None,
              help="Keep the epoch by closed-loop success (see --select-alpha) or the lowest validation L1 (default: the preset's).")
@click.option("--select-alpha", type=click.FloatRange(0.0, 0.5, max_open=True), default=None,
              help="Rollouts: a later epoch replaces the kept one unless the kept one succeeded on significantly more of the same seeds "
                   "(sign test, p < this); 0 keeps the last evaluated epoch (default: the preset's).")
@click.option("--rollout-env", default=None, help="Environment of the selection rollouts (default: the one an HDF5 file records).")
@click.option("--rollout-every", type=POSITIVE, default=None, help="Epochs between selection rollouts (default: the preset's).")
@click.option("--rollout-episodes", type=POSITIVE, default=None, help="Episodes per selection rollout (default: the preset's).")
@click.option("--rollout-replan-every", "rollout_replan_every", type=POSITIVE, default=None,
              help="Steps of each chunk the selection rollouts execute before replanning (default: the whole chunk; use what you deploy).")
@click.option("--rollout-batch", type=POSITIVE, default=None,
              help="Selection episodes played side by side, one env each, their chunks predicted in one batch: the same outcomes, "
                   "faster on a CPU (default: the preset's).")
@click.option("--shift", type=NON_NEGATIVE, default=None, help="Random-shift augmentation in pixels, 0 off (default: the preset's).")
@click.option("--ema-decay", type=click.FloatRange(0.0, 1.0, max_open=True), default=None,
              help="Validate, roll out and save a moving average of the weights with this decay, 0 off (default: the preset's).")
@click.option("--object-loss", type=click.FloatRange(0.0), default=None,
              help="Weight of the auxiliary object-state regression where the data records obs/object, 0 off (default: the preset's).")
@click.option("--compile/--no-compile", "compile_forward", default=None,
              help="torch.compile the LLM's decoder layers for the training steps (inductor): fused kernels, the same model; a CPU "
                   "needs a C++ compiler and Python.h (default: the preset's).")
@click.option("--aggregation-tokens", type=int, default=0, show_default=True,
              help="CogVLA: aggregation tokens per ViT whose outputs replace its patches (0: off; CogVLA uses 64 of 256).")
@click.option("--vit-film", is_flag=True, help="CogVLA: FiLM every ViT block from the mean instruction embedding.")
@click.option("--moe", is_flag=True, help="CogVLA: mix the two ViTs with an instruction-conditioned router (two-ViT models).")
@click.option("--lfp-layers", default=None, help="CogVLA: comma-separated LLM layers that prune visual tokens, e.g. 2,4 (CogVLA: 5,10,...,30).")
@click.option("--action-tokens", type=int, default=0, show_default=True, help="CogVLA CAtten: bidirectional action tokens (0: one causal query).")
@click.option("--lora-rank", type=int, default=None, help="Fine-tune --base with LoRA adapters of this rank on the LLM (peft).")
@click.option("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
@click.option("--base", type=click.Path(exists=True, file_okay=False), default=None, help="Trained policy folder to fine-tune (with --lora-rank).")
@click.option("--parallel", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
              help="Under torchrun: replicate the model (ddp) or shard its trained parameters over the ranks (fsdp).")
@click.option("--init", type=click.Path(exists=True, file_okay=False), default=None,
              help="Go on training this policy folder (same preset and tokenizer; its statistics are kept), e.g. on DAgger's aggregated data.")
@_train_options
def train_policy_command(data: DataSource, tokenizer: str, out: str, freeze_backbone: bool, select_by: str | None, select_alpha: float | None,
                         rollout_env: str | None,
                         rollout_every: int | None, rollout_episodes: int | None, rollout_replan_every: int | None, rollout_batch: int | None, shift: int | None, ema_decay: float | None, object_loss: float | None, compile_forward: bool | None, aggregation_tokens: int, vit_film: bool, moe: bool, lfp_layers: str | None, action_tokens: int,
                         lora_rank: int | None, lora_alpha: float | None, base: str | None, parallel: str, init: str | None,
                         preset: str, epochs: int | None, batch_size: int | None, lr: float | None, warmup: float | None, seed: int | None, overwrite: bool) -> None:
    """Train PrismaticVLA + RFSQ head by behaviour cloning on RFSQ tokens (optionally with CogVLA's modules, or LoRA on --base)."""
    from rsd.config import AdapterConfig, CogVLAConfig
    from rsd.distributed import session
    from rsd.training.policy import train_policy

    spec = get_preset(preset)
    chosen = {"select_by": select_by, "select_alpha": select_alpha, "rollout_every": rollout_every, "rollout_episodes": rollout_episodes, "shift": shift,
              "rollout_replan_every": rollout_replan_every, "rollout_batch": rollout_batch, "ema_decay": ema_decay, "object_loss": object_loss,
              "compile": compile_forward}
    options = dataclasses.replace(spec.policy_options, **{name: value for name, value in chosen.items() if value is not None})
    cogvla = CogVLAConfig(aggregation_tokens=aggregation_tokens, film=vit_film, moe=moe, lfp_layers=tuple(_int_list(lfp_layers) or ()),
                          action_tokens=action_tokens)
    adapter = None if lora_rank is None else AdapterConfig(rank=lora_rank, alpha=lora_alpha or float(lora_rank))
    with session() as world:
        summary = train_policy(_at_image_size(data, spec.model.image_size), tokenizer, out, preset, _train_config(preset, "policy", epochs, batch_size, lr, warmup, seed), freeze_backbone,
                               options=options, rollout_env=rollout_env, cogvla=cogvla if cogvla.enabled else None, adapter=adapter, base=base,
                               parallel=parallel, init=init, overwrite=overwrite)
    if world.is_main:
        click.echo(json.dumps({"best": summary["best"], "fingerprint": summary["fingerprint"]}))


@main.command("collect-features")
@click.option("--policy", required=True, type=click.Path(exists=True, file_okay=False), help="Policy folder (the frozen main model).")
@data_source_options
@click.option("--exit-layer", required=True, type=NON_NEGATIVE, help="Layer k whose query hidden state the draft reads.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Features folder (an interrupted run is resumed shard by shard; under torchrun every rank writes its shards there).")
@click.option("--shard-size", type=POSITIVE, default=2048, show_default=True, help="Frames per shard.")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True, help="Frames per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (under torchrun: each rank's own GPU).")
@click.option("--dtype", default=None, help="fp32, fp16 or bf16 of the main model (default: fp32 on cpu, fp16 on cuda).")
def collect_features_command(policy: str, data: DataSource, exit_layer: int, out: str, shard_size: int, batch_size: int, device: str,
                             dtype: str | None) -> None:
    """Store exit-layer hidden states, main logits and tokens for every frame (sharded, resumable)."""
    from rsd.distributed import session
    from rsd.training.features import collect_features

    source = _at_image_size(data, _model_image_size(policy))
    with session() as world:
        summary = collect_features(policy, source, exit_layer, out, shard_size, batch_size, device=device, dtype=dtype)
    if world.is_main:
        click.echo(json.dumps(summary))


@main.command("train-draft")
@click.option("--features", required=True, type=click.Path(exists=True, file_okay=False), help="Features folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Draft folder to write.")
@click.option("--targets", type=click.Choice(["main", "ground_truth"]), default="main", show_default=True,
              help="Distil the main model's tokens, or fit the ground-truth tokens.")
@click.option("--kl-weight", type=NON_NEGATIVE_FLOAT, default=0.8, show_default=True, help="Weight of KL(main || draft).")
@click.option("--accept-weight", type=NON_NEGATIVE_FLOAT, default=0.3, show_default=True, help="Weight of the acceptance (total-variation) loss.")
@_train_options
def train_draft_command(features: str, out: str, targets: str, kl_weight: float, accept_weight: float, preset: str,
                        epochs: int | None, batch_size: int | None, lr: float | None, warmup: float | None, seed: int | None, overwrite: bool) -> None:
    """Train the draft's input projection and head on collected features."""
    from rsd.distributed import session
    from rsd.training.draft import train_draft

    with session() as world:
        summary = train_draft(features, out, preset, _train_config(preset, "draft", epochs, batch_size, lr, warmup, seed), targets, kl_weight,
                              accept_weight, overwrite=overwrite)
    if world.is_main:
        click.echo(json.dumps({"best": summary["best"], "parameters": summary["parameters"]}))


@main.command()
@click.option("--draft", required=True, type=click.Path(exists=True, file_okay=False), help="Trained draft folder.")
@click.option("--features", required=True, type=click.Path(exists=True, file_okay=False), help="Features folder the draft was trained on.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="calibration.json to write (default: DRAFT/calibration.json).")
@click.option("--alpha", type=OPEN_UNIT, default=0.05, show_default=True, help="Risk level: certified P(accepted and bad) <= alpha.")
@click.option("--delta", type=OPEN_UNIT, default=0.1, show_default=True, help="Allowed probability that the guarantee fails.")
@click.option("--tolerance", type=POSITIVE_FLOAT, default=1.0, show_default=True,
              help="A drafted step is bad when it misses the main model's step by more than this times the main model's own error.")
@click.option("--mode", type=click.Choice(["chunk", "prefix"]), default="prefix", show_default=True,
              help="Accept whole chunks, or the draft's confident leading steps (replanning sooner).")
@click.option("--statistic", type=click.Choice(["mean", "min", "step"]), default=None,
              help="Gate statistic: mean or min for chunk mode, step for prefix mode (default: min / step).")
@click.option("--min-steps", type=POSITIVE, default=6, show_default=True, help="Prefix mode: fewest leading steps worth accepting.")
@click.option("--max-steps", type=POSITIVE, default=None, help=MAX_STEPS_HELP)
@click.option("--confidence-layers", "layers", type=POSITIVE, default=None, help=LAYERS_HELP)
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True, help="Seed of the calibration/test split of the held-out episodes.")
@OVERWRITE
def calibrate(draft: str, features: str, out: str | None, alpha: float, delta: float, tolerance: float, mode: str,
              statistic: str | None, min_steps: int, max_steps: int | None, layers: int | None, seed: int, overwrite: bool) -> None:
    """Certify the gate's tau on held-out episodes (Learn-then-Test) and report it on a test half they did not fit."""
    from rsd.bundle import describe_gate
    from rsd.training.calibrate import calibrate as run_calibration

    path = out or str(Path(draft) / "calibration.json")
    report = run_calibration(draft, features, path, alpha=alpha, delta=delta, tolerance=tolerance, mode=mode,
                             statistic=statistic, min_steps=min_steps, max_steps=max_steps, layers=layers, seed=seed,
                             overwrite=overwrite)
    gate, risk, calib, test = report["gate"], report["risk"], report["calibration"], report["test"]
    click.echo(f"gate: {describe_gate(gate)}")
    click.echo(f"certified: {risk['guarantee']}; (1 - delta) upper bound on the risk at tau: {risk['upper_bound']:.4f}")
    for name, part in (("calibration half", calib), ("test half", test)):
        click.echo(f"{name} ({part['frames']} chunks): acceptance {part['coverage']:.3f}, risk {part['risk']:.4f}, "
                   f"steps per accepted chunk {part['steps_per_accepted']:.2f}")
    click.echo(f"wrote {path}")
    click.echo(json.dumps({"gate": gate, "upper_bound": risk["upper_bound"], "test_acceptance": test["coverage"], "test_risk": test["risk"]}))


def _int_list(text: str | None) -> list[int] | None:
    """Parse "8,16,24" into [8, 16, 24]; a part "5-7" is the range 5, 6, 7 (integers >= 0 only)."""
    if not text:
        return None
    numbers: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if part:
                low, _, high = part.partition("-")
                numbers.extend(range(int(low), int(high) + 1) if high else [int(low)])
    except ValueError as error:
        raise click.BadParameter(f"expected comma-separated integers >= 0 or ranges such as 8,16,24 or 0-9, got {text!r}") from error
    return numbers


def _exit_layers(ctx: click.Context, param: click.Parameter, text: str | None) -> list[int] | None:
    """Parse --exit-layers "8,16,24" into [8, 16, 24] (click callback)."""
    return _int_list(text)


@main.command("bench-latency")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None, help="Exported bundle (with --main).")
@click.option("--main", "main_dir", type=click.Path(exists=True, file_okay=False), default=None, help="Policy folder the bundle was made for.")
@click.option("--preset", default=None, help="Preset to build with random weights (with --random-weights), e.g. openvla-7b.")
@click.option("--random-weights", is_flag=True, help="Random weights in the preset's shapes: latency only.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp32 on cpu, fp16 on cuda).")
@click.option("--iters", type=POSITIVE, default=50, show_default=True, help="Timed iterations per stage.")
@click.option("--warmup", type=NON_NEGATIVE, default=10, show_default=True, help="Untimed warm-up iterations per stage (excluded).")
@click.option("--exit-layers", default=None, callback=_exit_layers,
              help="Comma-separated exit layers, e.g. 8,16,24 (default: N/4, N/2, 3N/4 or the bundle's).")
@click.option("--acceptance", type=UNIT, default=None, help="Acceptance rate for the speed-up when no observations are replayed.")
@click.option("--observations", type=click.Path(exists=True), default=None,
              help="Demo file or LeRobot folder whose frames are replayed (read as the data options say).")
@click.option("--tau", type=TAU, default=None, help="Gate threshold for the replay, in [0, 1] or inf (default: the bundle's).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the full report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write the latency-vs-acceptance plot (PNG).")
@click.option("--flops", is_flag=True, help="Count FLOPs per stage and chunk on the meta device instead of timing (with --preset; "
              "plain and each CogVLA module in the seed's debug order, early exit at the first --exit-layers, --acceptance default 0.7).")
@click.option("--prompt-tokens", type=POSITIVE, default=None, help="Prompt tokens of the FLOP count (with --flops; default 24).")
@click.option("--compile", "compile_mode", type=click.Choice(["auto", "inductor", "reduce-overhead", "aot"]), default=None, is_flag=False,
              flag_value="auto", help="Also time every stage and both policies eager against compiled, interleaved (bare --compile: "
              "auto = CUDA graphs on CUDA, AOTInductor on the CPU).")
@_data_options
def bench_latency_command(bundle: str | None, main_dir: str | None, preset: str | None, random_weights: bool, device: str | None,
                          dtype: str | None, iters: int, warmup: int, exit_layers: list[int] | None, acceptance: float | None,
                          observations: str | None, tau: float | None, json_path: str | None, plot_path: str | None, flops: bool,
                          prompt_tokens: int | None, compile_mode: str | None, **data_options: Any) -> None:
    """Time draft vs main stages and the speculative policy vs the baseline (or count FLOPs with --flops)."""
    from rsd.bench.flops import flops_json_line
    from rsd.bench.latency import run_bench_latency
    from rsd.bench.report import json_line

    if observations is not None and main_dir is not None:
        observations = _at_image_size(_data_source(observations, **data_options), _model_image_size(main_dir))
    report = run_bench_latency(bundle, main_dir, preset, random_weights, device, dtype, iters, warmup, exit_layers,
                               acceptance, observations, tau=tau, json_path=json_path, plot_path=plot_path, flops=flops,
                               prompt_tokens=prompt_tokens, compile=compile_mode or "none")
    click.echo(report["markdown"])
    click.echo(flops_json_line(report) if flops else json_line(report))


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False), help="Folder for every artifact and report.md.")
@click.option("--quick", is_flag=True, help="A smaller run (about 80 s on 2 cores) that exercises every step.")
@click.option("--seed", type=click.IntRange(0), default=None,
              help="Another run of the recipe: seeds its demonstrations, recovery episodes, initialisation and batches (default 0).")
@OVERWRITE
def demo(out: str, quick: bool, seed: int | None, overwrite: bool) -> None:
    """Run the whole pipeline on the CPU with built-in data and write OUT/report.md."""
    from rsd.demo import run_demo

    run_demo(out, quick, overwrite=overwrite, seed=seed)


@main.command("generate-demos")
@click.option("--env", "env_name", default="tabletop", show_default=True, help="tabletop, robosuite:<Task> or libero:<suite>[/<task>].")
@click.option("--episodes", type=POSITIVE, default=200, show_default=True,
              help="Expert episodes to run (libero: per task; failures are dropped).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HDF5 file to write (LIBERO layout).")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True, help="First seed (episodes use seed .. seed+episodes-1).")
@click.option("--image-size", type=IMAGE_SIDE, default=64, show_default=True, help="Side of the rendered camera frames.")
@click.option("--task-family", default=None, type=click.Choice(["any", "pick_place", "next_to"]),
              help="Tabletop task family (default: the world's own, both families).")
@click.option("--camera", "cameras", multiple=True,
              help="robosuite: camera to render, repeat for more (agentview, robot0_eye_in_hand; default: agentview).")
@click.option("--tasks", default=None, help="libero: task ids of the suite, e.g. 0,1 or 0-9 (default: all).")
@click.option("--workers", type=POSITIVE, default=1, show_default=True, help="libero: episodes run in this many processes.")
@click.option("--libero-assets", type=click.Path(exists=True, file_okay=False), default=None,
              help="libero: scene assets folder (default: RSD_LIBERO_ASSETS, then the installed assets wheels).")
@click.option("--noise", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="DART: std of the Gaussian noise added to the executed actions (the file records the expert's clean actions).")
@click.option("--policy", type=click.Path(exists=True, file_okay=False), default=None,
              help="DAgger: a trained policy folder acts first and the expert takes over from the state it left (recorded from there).")
@click.option("--handover", type=POSITIVE, default=None,
              help="With --policy: the policy acts for 1..N steps (drawn per seed) before the expert takes over.  [default: 40]")
@click.option("--aggregate", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Write this demonstration file's episodes (same env) first: DAgger's aggregated dataset in one file.")
@click.option("--aggregate-episodes", type=POSITIVE, default=None,
              help="With --aggregate: keep only its first N episodes (e.g. part of the demonstrations beside the recovery episodes).")
@click.option("--replan-every", type=POSITIVE, default=None,
              help="With --policy: steps of each chunk it executes before replanning, as deployed (default: the whole chunk).")
@click.option("--batch", type=POSITIVE, default=1, show_default=True,
              help="With --policy: episodes played side by side, one env each, the policy's chunks predicted in one batch (the same "
                   "episodes, faster on a CPU).")
@OVERWRITE
def generate_demos_command(env_name: str, episodes: int, out: str, seed: int, image_size: int, task_family: str | None, cameras: tuple[str, ...],
                           tasks: str | None, workers: int, libero_assets: str | None, noise: float, policy: str | None, handover: int | None, aggregate: str | None,
                           aggregate_episodes: int | None, replan_every: int | None, batch: int, overwrite: bool) -> None:
    """Write scripted-expert demonstrations to an HDF5 file (libero: resumable, one shard per episode)."""
    if not env_name.startswith("libero:") and (tasks or workers != 1 or libero_assets):
        raise click.BadParameter(f"--tasks, --workers and --libero-assets apply to libero:* environments, got --env {env_name}.")
    if task_family is not None and env_name != "tabletop":
        raise click.BadParameter(f"--task-family applies to the tabletop world, got --env {env_name}.")
    if cameras and not env_name.startswith("robosuite:"):
        raise click.BadParameter(f"--camera applies to robosuite:* environments, got --env {env_name}.")
    if (noise or policy or aggregate) and env_name.startswith("libero:"):
        raise click.BadParameter(f"--noise, --policy and --aggregate apply to the tabletop and robosuite experts, got --env {env_name}.")
    if handover is not None and policy is None:
        raise click.BadParameter("--handover is the number of steps --policy acts before the expert takes over: pass --policy too.")
    if replan_every is not None and policy is None:
        raise click.BadParameter("--replan-every is how --policy executes its chunks: pass --policy too.")
    if batch != 1 and policy is None:
        raise click.BadParameter("--batch is how many of --policy's episodes play side by side: pass --policy too.")
    if aggregate_episodes is not None and aggregate is None:
        raise click.BadParameter("--aggregate-episodes is how many episodes of --aggregate to keep: pass --aggregate too.")
    from rsd.io import refuse_existing_file

    refuse_existing_file(out, overwrite)
    if env_name.startswith("libero:"):
        from rsd.envs.libero_demos import generate_libero_demos

        summary = generate_libero_demos(env_name.partition(":")[2], episodes, out, tasks=_int_list(tasks), seed=seed, image_size=image_size,
                                        workers=workers, assets=libero_assets)
        click.echo("per task (kept/failed): " + ", ".join(f"{t}: {k}/{f}" for t, (k, f) in summary["per_task"].items()))
    else:
        from rsd.envs.demos import generate_demos

        summary = generate_demos(env_name, episodes, out, seed=seed, image_size=image_size, noise=noise, policy=policy, aggregate=aggregate,
                                 aggregate_episodes=aggregate_episodes, replan_every=replan_every, batch=batch, **({} if handover is None else {"handover": handover}),
                                 **({} if task_family is None else {"task_family": task_family}),
                                 **({"cameras": list(cameras)} if cameras else {}))
        if policy is not None:
            click.echo(f"the policy ended {summary['learner_done']} episodes before the expert took over (nothing recorded)")
        if summary["aggregated"]:
            click.echo(f"the file starts with {summary['aggregated']} episodes of {aggregate}")
    click.echo(
        f"wrote {summary['episodes']} episodes ({summary['failed']} failed, dropped) to {summary['out']}: "
        f"{summary['steps']} steps in {summary['seconds']:.1f} s ({summary['steps_per_second']:.0f} steps/s)"
    )


@main.command("check-expert")
@click.option("--env", "env_name", required=True, help="libero:<suite>, e.g. libero:libero_spatial.")
@click.option("--tasks", default=None, help="Task ids, e.g. 0-9 or 0,4 (default: all of the suite).")
@click.option("--trials", type=POSITIVE, default=50, show_default=True, help="Init states 0 .. N-1 of each task (the protocol's trials).")
@click.option("--init", default="suite", show_default=True, type=click.Choice(["suite", "sampled"]), help="Fixed init states or sampled placements.")
@click.option("--workers", type=POSITIVE, default=1, show_default=True, help="Processes running tasks side by side.")
@click.option("--libero-assets", type=click.Path(exists=True, file_okay=False), default=None, help="Scene assets folder (default: found).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write every episode's outcome as JSON (after every job).")
def check_expert_command(env_name: str, tasks: str | None, trials: int, init: str, workers: int, libero_assets: str | None,
                         json_path: str | None) -> None:
    """Success rate of the scripted LIBERO expert per task, without rendering (physics only)."""
    prefix, _, suite = env_name.partition(":")
    if prefix != "libero" or not suite:
        raise click.BadParameter(f"--env: expected libero:<suite>, got {env_name!r}.")
    from rsd.envs.libero_demos import check_expert, format_expert_table
    from rsd.io import write_text_atomic

    def write(results: dict[int, list[tuple[int, bool, int]]]) -> None:
        if json_path:  # after every job, so an interrupted run keeps what it measured
            write_text_atomic(json_path, json.dumps({str(t): [{"trial": a, "success": b, "steps": c} for a, b, c in rows]
                                                    for t, rows in results.items()}, indent=1) + "\n")

    results = check_expert(suite, _int_list(tasks), range(trials), workers=workers, init=init, assets=libero_assets, on_result=write)
    click.echo(format_expert_table(suite, init, results))


@main.command("convert")
@click.option("--to", "to", required=True, type=click.Choice(["lerobot", "hdf5"]), help="Format to write.")
@click.option("--out", required=True, type=click.Path(), help="LeRobot folder or HDF5 file to write.")
@click.option("--fps", type=POSITIVE, default=20, show_default=True, help="Frame rate recorded in the LeRobot metadata.")
@click.option("--video", type=click.Choice(["high", "lerobot"]), default="high", show_default=True,
              help="high: H.264 4:4:4 CRF 0 (near lossless); lerobot: LeRobot's AV1 CRF 30 (small, lossy).")
@click.option("--robot-type", default=None, help="robot_type written to meta/info.json (HDF5: the env name).")
@data_source_options
@OVERWRITE
def convert_command(data: DataSource, to: str, out: str, fps: int, video: str, robot_type: str | None, overwrite: bool) -> None:
    """Convert demonstrations between rsd's HDF5 layout and a LeRobot v3.0 dataset folder."""
    from rsd.data.convert import convert

    click.echo(json.dumps(convert(data, out, to, fps=fps, video=video, robot_type=robot_type, overwrite=overwrite)))


@main.command("eval")
@click.option("--policy", required=True, type=click.Path(exists=True, file_okay=False), help="Policy folder (main model).")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None, help="Bundle: also run SpeculativePolicy.")
@click.option("--env", "env_name", default="tabletop", show_default=True, help="Environment, e.g. tabletop or robosuite:Lift.")
@click.option("--episodes", type=POSITIVE, default=50, show_default=True, help="Episodes per policy (seeds seed .. seed+episodes-1).")
@click.option("--seed", type=NON_NEGATIVE, default=10_000, show_default=True, help="First seed.")
@click.option("--video", type=click.Path(file_okay=False), default=None, help="Folder for one video per episode.")
@click.option("--video-format", default="gif", show_default=True, type=click.Choice(["gif", "mp4"]), help="mp4 needs imageio-ffmpeg.")
@click.option("--device", default=None, help="cpu or cuda (default: resolved and logged).")
@click.option("--engine", default="auto", show_default=True, help="Bundle engine: auto, tensorrt, onnx, torchscript, torch.")
@click.option("--tau", type=TAU, default=None, help="Gate threshold, in [0, 1] or inf (default: the bundle's).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the reports as JSON.")
@click.option("--image-size", type=IMAGE_SIDE, default=None, help="Camera frame side the environment renders (default: the policy's image size).")
@click.option("--libero-assets", type=click.Path(exists=True, file_okay=False), default=None,
              help="LIBERO scene assets folder (libero:* environments; default: RSD_LIBERO_ASSETS, then the installed assets wheels).")
@click.option("--workers", type=POSITIVE, default=1, show_default=True,
              help="Local processes sharing the seeds (torchrun's ranks do the same); latency is then not reported.")
@click.option("--replan-every", type=POSITIVE, default=None,
              help="Steps executed from each action chunk before the policy replans (default: the whole chunk).")
@click.option("--batch", type=POSITIVE, default=1, show_default=True,
              help="Episodes played side by side in each process, one env each, their chunks predicted in one batch: the same "
                   "outcomes, faster on a CPU; latency is then not reported (no videos).")
def eval_command(policy: str, bundle: str | None, env_name: str, episodes: int, seed: int, video: str | None, video_format: str,
                 device: str | None, engine: str, tau: float | None, json_path: str | None, image_size: int | None,
                 libero_assets: str | None, workers: int, replan_every: int | None, batch: int) -> None:
    """Closed-loop evaluation of MainOnlyPolicy (and SpeculativePolicy with --bundle) on the same seeds."""
    from rsd.distributed import session, world_from_env
    from rsd.envs.evaluate import compare_in_processes, compare_on_ranks, format_comparison

    if libero_assets and not env_name.startswith("libero:"):
        raise click.BadParameter(f"--libero-assets applies to libero:* environments, got --env {env_name}.")
    size = image_size or _model_image_size(policy)
    env_kwargs = {k: v for k, v in {"image_size": size, "assets": libero_assets}.items() if v is not None}
    options = {"bundle": bundle, "engine": engine, "taus": {"speculative": tau}, "device": device, "video_dir": video,
               "video_format": video_format, "env_kwargs": env_kwargs, "replan_every": replan_every, "batch": batch}
    seeds = list(range(seed, seed + episodes))
    if workers > 1:
        if world_from_env().world_size > 1:
            raise click.BadParameter("--workers starts local ranks itself; under torchrun leave it at 1 (the ranks share the seeds).")
        reports = compare_in_processes(workers, policy, env_name, seeds, **options)
    else:
        with session() as world:
            reports = compare_on_ranks(policy, env_name, seeds, **options)
        if not world.is_main:
            return
    for name, report in reports.items():
        click.echo(f"## {name}\n\n{report.to_markdown()}")
    if line := format_comparison(reports):
        click.echo(line)
    if json_path:
        from rsd.io import write_text_atomic

        write_text_atomic(json_path, json.dumps({k: v.to_json() for k, v in reports.items()}, indent=2) + "\n")


def _float_list(text: str | None) -> list[float]:
    """Parse "0.05,0.2" into [0.05, 0.2] (empty for none)."""
    if not text:
        return []
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise click.BadParameter(f"expected comma-separated numbers such as 0.05,0.2, got {text!r}") from error


@main.command("sweep")
@click.option("--policy", required=True, type=click.Path(exists=True, file_okay=False), help="Policy folder (main model).")
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False), help="Bundle made for the policy.")
@click.option("--env", "env_name", default="tabletop", show_default=True, help="Environment, e.g. tabletop or robosuite:Lift.")
@click.option("--episodes", default=100, show_default=True, help="Seeds (one episode each per policy): seed .. seed+episodes-1.")
@click.option("--seed", default=10_000, show_default=True, help="First seed.")
@click.option("--taus", default=None, help="Comma-separated thresholds for the bundle's gate mode, e.g. 0.5,0.7.")
@click.option("--modes", default="chunk,prefix", show_default=True, help="Gate modes to calibrate (with --alphas, --draft, --features).")
@click.option("--alphas", default=None, help="Comma-separated risk levels to calibrate a gate for, e.g. 0.05,0.2.")
@click.option("--draft", type=click.Path(exists=True, file_okay=False), default=None, help="Draft folder (to calibrate --alphas).")
@click.option("--features", type=click.Path(exists=True, file_okay=False), default=None, help="Its features folder.")
@click.option("--delta", default=0.1, show_default=True, help="Calibration: allowed probability that the guarantee fails.")
@click.option("--tolerance", default=1.0, show_default=True, help="Calibration: error tolerance in units of the main model's own error.")
@click.option("--min-steps", default=6, show_default=True, help="Calibration, prefix mode: fewest leading steps worth accepting.")
@click.option("--max-steps", type=POSITIVE, default=None, help="Calibration: " + MAX_STEPS_HELP)
@click.option("--confidence-layers", "layers", type=POSITIVE, default=None, help="Calibration: " + LAYERS_HELP)
@click.option("--replan-every", type=POSITIVE, default=None,
              help="Steps every policy (main-only too) executes from each chunk before replanning (default: the whole chunk).")
@click.option("--rule", default="within:5", show_default=True,
              help="Operating point: 'within:P' (fastest setting within P success points of main-only) or 'fastest'.")
@click.option("--engine", default="auto", show_default=True, help="Bundle engine: auto, tensorrt, onnx, torchscript, torch.")
@click.option("--device", default=None, help="cpu or cuda (default: resolved and logged).")
@click.option("--warmup", default=3, show_default=True, help="Untimed warm-up chunks per policy (excluded).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write success vs speed-up (PNG).")
@click.option("--image-size", type=int, default=None, help="Camera frame side given to the policy (default: the environment's).")
def sweep_command(policy: str, bundle: str, env_name: str, episodes: int, seed: int, taus: str | None, modes: str, alphas: str | None,
                  draft: str | None, features: str | None, delta: float, tolerance: float, min_steps: int, max_steps: int | None,
                  layers: int | None, replan_every: int | None, rule: str, engine: str, device: str | None, warmup: int, json_path: str | None,
                  plot_path: str | None, image_size: int | None) -> None:
    """Success, acceptance and compute per control step of main-only and each gate setting on the same seeds."""
    from rsd.bench.frontier import run_sweep_command, sweep_json_line

    report = run_sweep_command(policy, bundle, env_name, episodes, seed, _float_list(taus),
                               [m.strip() for m in modes.split(",") if m.strip()] if alphas else [], _float_list(alphas), draft, features,
                               delta, tolerance, min_steps, max_steps, layers, rule, engine, device, warmup, json_path, plot_path,
                               {} if image_size is None else {"image_size": image_size}, replan_every=replan_every)
    click.echo(report["markdown"])
    click.echo(sweep_json_line(report))


@main.command("export-draft")
@click.option("--draft", required=True, type=click.Path(exists=True, file_okay=False), help="Draft folder (rsd train-draft).")
@click.option("--tokenizer", required=True, type=click.Path(exists=True, file_okay=False), help="Tokenizer folder (rsd train-tokenizer).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False), default=None,
              help="calibration.json (rsd calibrate); without it tau = inf (never accept).")
@click.option("--features", type=click.Path(exists=True, file_okay=False), default=None,
              help="Features folder: parity on the draft's held-out episodes (default: seeded random rows).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--formats", default="onnx,torchscript", show_default=True, help="Comma-separated: aotinductor (.pt2, preferred), onnx, torchscript (deprecated by torch), tensorrt.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]), help="Draft engine precision (decoders stay fp32).")
@click.option("--opset", type=click.IntRange(min=18), default=None, help="ONNX opset, 18 or later (default: the exporter's).")
@click.option("--device", default="cpu", show_default=True, help="Device to build and check the engines on (cpu or cuda).")
@click.option("--dry-run", is_flag=True, help="Plan TensorRT engines in the manifest (built: false) without building them.")
@OVERWRITE
def export_draft_command(draft: str, tokenizer: str, calibration: str | None, features: str | None, out: str, formats: str,
                         precision: str, opset: int | None, device: str, dry_run: bool, overwrite: bool) -> None:
    """Compile the draft and decoders, check parity against PyTorch, and write a bundle."""
    from rsd.bundle import parity_text
    from rsd.export import export_draft

    report = export_draft(draft, tokenizer, out, formats=formats.split(","), precision=precision, calibration=calibration,
                          features=features, dry_run=dry_run, opset=opset, device=device, overwrite=overwrite)
    for engine in report["engines"]:
        seconds = "-" if engine["export_seconds"] is None else f"{engine['export_seconds']:.2f} s"
        click.echo(f"{engine['name']:<12} {engine['format']:<12} {engine['precision']:<5} {seconds:>8} "
                   f"{engine['bytes'] / 1e6:8.2f} MB  {parity_text(engine)}")
    click.echo(f"wrote {report['out']} in {report['seconds']:.1f} s" + ("" if report["calibrated"] else " (not calibrated: tau = inf)"))


@main.command("export-segments")
@click.option("--main", "main_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Policy folder (rsd train-policy).")
@click.option("--exit-layer", type=POSITIVE, required=True, help="The draft's exit layer k: prefix 0..k-1 and suffix k..N-1 are packaged.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder of .pt2 packages to write.")
@click.option("--prompt-tokens", type=POSITIVE, default=48, show_default=True, help="Static prompt length (prompts are padded to it).")
@click.option("--batch", type=POSITIVE, default=1, show_default=True, help="Static batch size.")
@click.option("--device", default="cpu", show_default=True, help="Device the packages are compiled for (cpu or cuda).")
@click.option("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp32 on cpu, fp16 on cuda).")
@OVERWRITE
def export_segments_command(main_dir: str, exit_layer: int, out: str, prompt_tokens: int, batch: int, device: str, dtype: str | None,
                            overwrite: bool) -> None:
    """Package the main model's segments for one exit layer as AOTInductor .pt2 files (parity-checked, hashed)."""
    from rsd.export.segments import export_main_segments
    from rsd.runtime.policy import load_main

    manifest = export_main_segments(load_main(main_dir, device, dtype), exit_layer, out, prompt_tokens, batch, overwrite)
    for entry in manifest["files"]:
        click.echo(f"{entry['name']:<14} {entry['bytes'] / 1e6:8.2f} MB  sha256 {entry['sha256'][:16]}…")
    click.echo(f"wrote {out} in {manifest['seconds']:.1f} s; parity: hidden max |diff| {manifest['parity']['hidden_max_abs']:.2e}, "
               f"head tokens {100 * manifest['parity']['token_agreement']:.1f} % equal")


@main.command("inspect")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
def inspect_command(bundle: str) -> None:
    """Verify a bundle (manifest schema and digest, confined paths, every file hash), then print its manifest."""
    from rsd.bundle import DIGEST_FILE, format_manifest, manifest_digest, verify_bundle

    manifest = verify_bundle(bundle)
    digest = manifest_digest(bundle)
    click.echo(format_manifest(manifest))
    click.echo(f"\nmanifest digest: sha256 {digest[:16]}… matches {DIGEST_FILE}" if digest else
               f"\nmanifest digest: none recorded ({DIGEST_FILE} missing: written before rsd recorded one); "
               "edits to manifest.json cannot be detected. Re-export the bundle to add one.")
    click.echo("all file hashes verified")


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
@click.option("--steps", type=POSITIVE, default=3000, show_default=True, help="Optimiser steps (the cosine schedule's length).")
@click.option("--max-seconds", type=NON_NEGATIVE_FLOAT, default=900.0, show_default=True, help="Stop after this much training time (0: all steps).")
@click.option("--batch-size", type=POSITIVE, default=4, show_default=True, help="Windows per step.")
@click.option("--seq-len", type=POSITIVE, default=256, show_default=True, help="Tokens per window.")
@click.option("--lr", type=POSITIVE_FLOAT, default=2e-3, show_default=True, help="Peak learning rate.")
@click.option("--resume", type=click.Path(exists=True, file_okay=False), default=None, help="Continue training the LM saved here.")
@OVERWRITE
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available; fp32 either way).")
@click.option("--threads", type=POSITIVE, default=1, show_default=True, help="torch threads.")
def train_text_lm_command(out: str, preset: str, steps: int, max_seconds: float, batch_size: int, seq_len: int, lr: float,
                          resume: str | None, overwrite: bool, device: str | None, threads: int) -> None:
    """Train the tiny Qwen3 LM (and its BPE) on the Python standard library's sources."""
    import torch

    from rsd.training.text_lm import TextTrainConfig, train_text_lm

    torch.set_num_threads(threads)
    train = TextTrainConfig(steps=steps, max_seconds=max_seconds, batch_size=batch_size, seq_len=seq_len, lr=lr)
    metrics = train_text_lm(out, preset, train, resume=resume, device=device, overwrite=overwrite)
    click.echo(json.dumps({k: metrics[k] for k in ("steps", "tokens_seen", "final_train_loss", "val_loss", "seconds", "fingerprint")}))


@main.command("train-layer-draft")
@click.option("--target", required=True, type=click.Path(exists=True, file_okay=False), help="Text LM folder or AR policy folder.")
@click.option("--layers", required=True, help="Target layers the draft runs, e.g. 0,5,11,16,22,27.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Draft folder to write.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), default=None, help="Demonstrations (AR policy targets only).")
@click.option("--knowledge", is_flag=True, help="Add the gated cross-attention over a knowledge cache (text LM targets).")
@click.option("--transition-size", type=NON_NEGATIVE, default=64, show_default=True, help="Bottleneck width of each transition (0: none).")
@click.option("--tune-layers", is_flag=True, help="Fine-tune copies of the sampled layers (default: share the target's, frozen).")
@click.option("--steps", type=POSITIVE, default=300, show_default=True, help="Optimiser steps.")
@click.option("--batch-size", type=NON_NEGATIVE, default=0, show_default=True, help="Windows or frames per step (0: 4 windows for text, 32 frames for the VLA).")
@click.option("--lr", type=POSITIVE_FLOAT, default=3e-3, show_default=True, help="Peak learning rate.")
@click.option("--kl-weight", type=NON_NEGATIVE_FLOAT, default=0.8, show_default=True, help="Weight of KL(target || draft).")
@click.option("--accept-weight", type=NON_NEGATIVE_FLOAT, default=0.3, show_default=True, help="Weight of the rejection probability.")
@click.option("--seq-len", type=POSITIVE, default=256, show_default=True, help="Text: tokens per training sequence.")
@click.option("--self-distill", type=NON_NEGATIVE, default=0, show_default=True, help="Text: train on this many sequences the target writes (0: corpus).")
@click.option("--prompt-tokens", type=POSITIVE, default=64, show_default=True, help="Text self-distillation: corpus tokens before the target writes.")
@click.option("--memory-tokens", type=POSITIVE, default=512, show_default=True, help="Knowledge drafts: memory tokens per sequence.")
@click.option("--max-seconds", type=NON_NEGATIVE_FLOAT, default=0.0, show_default=True, help="Stop after this much training time (0: all steps).")
@OVERWRITE
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available; fp32 either way).")
@click.option("--threads", type=POSITIVE, default=1, show_default=True, help="torch threads.")
def train_layer_draft_command(target: str, layers: str, out: str, data: str | None, knowledge: bool, transition_size: int, tune_layers: bool,
                              steps: int, batch_size: int, lr: float, kl_weight: float, accept_weight: float, seq_len: int, self_distill: int,
                              prompt_tokens: int, memory_tokens: int, max_seconds: float, overwrite: bool, device: str | None, threads: int) -> None:
    """Distil a layer-sampled draft (KL 0.8 + acceptance 0.3) from a text LM or an AR-mode VLA policy."""
    import torch

    from rsd.training.layer_draft import DraftTrainConfig, train_layer_draft

    torch.set_num_threads(threads)
    train = DraftTrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, kl_weight=kl_weight, accept_weight=accept_weight,
                             memory_tokens=memory_tokens, self_distill=self_distill, prompt_tokens=prompt_tokens, max_seconds=max_seconds)
    summary = train_layer_draft(target, out, _layer_list(layers), train, transition_size, knowledge, tune_layers, data, device, overwrite)
    click.echo(json.dumps({k: summary[k] for k in ("val_before", "val", "steps", "seconds")}))


@main.command("train-ar-policy")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Demonstrations (LIBERO HDF5 layout).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="AR policy folder to write.")
@_train_options
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available; fp32 either way).")
@click.option("--threads", type=POSITIVE, default=1, show_default=True, help="torch threads.")
def train_ar_policy_command(data: str, out: str, preset: str, epochs: int | None, batch_size: int | None, lr: float | None, warmup: float | None, seed: int | None,
                            overwrite: bool, device: str | None, threads: int) -> None:
    """Train PrismaticVLA in OpenVLA's autoregressive action mode (256 bins, 7 tokens per step)."""
    import torch

    from rsd.training.ar_policy import train_ar_policy

    torch.set_num_threads(threads)
    summary = train_ar_policy(data, out, preset, _train_config(preset, "policy", epochs, batch_size, lr, warmup, seed), device=device,
                              overwrite=overwrite)
    click.echo(json.dumps({"best": summary["best"], "fingerprint": summary["fingerprint"]}))


@main.command("bench-text")
@click.option("--lm", "lm_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Text LM folder (train-text-lm).")
@click.option("--draft", "drafts", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="Layer-draft folder (repeat for several).")
@click.option("--prompts", type=POSITIVE, default=8, show_default=True, help="Timed prompts (plus one warm-up).")
@click.option("--prompt-tokens", type=POSITIVE, default=64, show_default=True, help="Tokens per prompt.")
@click.option("--new-tokens", type=POSITIVE, default=128, show_default=True, help="Tokens generated per prompt.")
@click.option("--gamma", type=POSITIVE, default=5, show_default=True, help="Draft tokens per round.")
@click.option("--memory-tokens", type=POSITIVE, default=512, show_default=True, help="Knowledge drafts: tokens of the prompt's file in the cache.")
@click.option("--temperature", type=NON_NEGATIVE_FLOAT, default=0.0, show_default=True, help="0: greedy (outputs checked against plain decoding); > 0: sampled.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True, help="Nucleus of sampled decoding.")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True, help="Picks the prompt windows and seeds sampling.")
@click.option("--repeats", type=POSITIVE, default=1, show_default=True, help="Timed runs per prompt and variant; the fastest counts.")
@click.option("--threads", type=POSITIVE, default=1, show_default=True, help="torch threads.")
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
@click.option("--episodes", type=POSITIVE, default=20, show_default=True, help="Seeds per variant (plus one warm-up seed).")
@click.option("--seed", type=NON_NEGATIVE, default=10_000, show_default=True, help="First seed.")
@click.option("--gamma", type=POSITIVE, default=3, show_default=True, help="Draft tokens per round.")
@click.option("--threads", type=POSITIVE, default=1, show_default=True, help="torch threads.")
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
    """Run one command of the group as its own console script, with the group's logging and error handling (and --debug)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:]
    try:
        command.main(args=[a for a in args if a != "--debug"], standalone_mode=False)
    except click.exceptions.Abort:
        raise SystemExit(1) from None
    except click.ClickException as error:
        error.show()
        raise SystemExit(error.exit_code) from error
    except Exception as error:  # the one place every failure becomes an exit status
        exit_on_error(error, "--debug" in args)


def bench_latency_main() -> None:
    """Console entry point `bench-latency`: the same command as `rsd bench-latency`."""
    run_standalone(bench_latency_command)


def export_draft_main() -> None:
    """Console entry point `export-draft`: the same command as `rsd export-draft`."""
    run_standalone(export_draft_command)


if __name__ == "__main__":  # torchrun -m rsd.cli <command> ...
    main()
