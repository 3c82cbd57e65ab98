"""Click commands `generate-demos` and `eval`: thin wrappers over `generate_demos` and `evaluate`.

They are registered on the `rsd` group in `rsd/cli.py`; heavy modules are imported inside the commands so
`rsd --help` stays fast.

Usage:
    rsd generate-demos --episodes 200 --out runs/demo/demos.hdf5
    rsd eval --policy runs/demo/policy --bundle runs/demo/bundle --episodes 50 --json runs/demo/eval.json
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("generate-demos")
@click.option("--env", "env_name", default="tabletop", show_default=True, help="tabletop or robosuite:<Task>.")
@click.option("--episodes", default=200, show_default=True, help="Expert episodes to run (failures are dropped).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HDF5 file to write (LIBERO layout).")
@click.option("--seed", default=0, show_default=True, help="First seed (episodes use seed .. seed+episodes-1).")
@click.option("--image-size", default=64, show_default=True, help="Side of the rendered camera frames.")
@click.option("--task-family", default="any", show_default=True, type=click.Choice(["any", "pick_place", "next_to"]), help="Tabletop task family.")
def generate_demos_command(env_name: str, episodes: int, out: str, seed: int, image_size: int, task_family: str) -> None:
    """Write scripted-expert demonstrations to an HDF5 file."""
    from rsd.data.demos import generate_demos

    summary = generate_demos(env_name, episodes, out, seed=seed, image_size=image_size, task_family=task_family)
    click.echo(
        f"wrote {summary['episodes']} episodes ({summary['failed']} failed, dropped) to {summary['out']}: "
        f"{summary['steps']} steps in {summary['seconds']:.1f} s ({summary['steps_per_second']:.0f} steps/s)"
    )


@click.command("eval")
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
    from rsd.envs.evaluate import evaluate
    from rsd.runtime.policy import MainOnlyPolicy, SpeculativePolicy, load_main

    env_kwargs = {k: v for k, v in {"image_size": image_size, "assets": libero_assets}.items() if v is not None}
    if libero_assets and not env_name.startswith("libero:"):
        raise click.BadParameter(f"--libero-assets applies to libero:* environments, got --env {env_name}.")
    main_model = load_main(policy, device, None)
    seeds = list(range(seed, seed + episodes))
    policies = {"baseline": MainOnlyPolicy(main_model)}
    if bundle:
        policies["speculative"] = SpeculativePolicy.from_bundle(bundle, main=main_model, engine=engine, tau=tau)
    reports = {}
    for name, candidate in policies.items():
        videos = None if video is None else Path(video) / name
        reports[name] = evaluate(candidate, env_name, seeds, video_dir=videos, video_format=video_format, env_kwargs=env_kwargs)
        click.echo(f"## {name}\n\n{reports[name].to_markdown()}")
    if "speculative" in reports:
        base, spec = reports["baseline"], reports["speculative"]
        line = f"speculative vs baseline: success {100 * spec.success_rate:.1f} % vs {100 * base.success_rate:.1f} %"
        if base.latency_ms and spec.latency_ms:
            line += f", chunk latency p50 {spec.latency_ms['p50']:.2f} ms vs {base.latency_ms['p50']:.2f} ms ({base.latency_ms['p50'] / spec.latency_ms['p50']:.2f}x)"
        click.echo(line)
    if json_path:
        Path(json_path).write_text(json.dumps({k: v.to_json() for k, v in reports.items()}, indent=2) + "\n")
