"""Click commands `generate-demos`, `check-expert` and `eval`: thin wrappers over the library functions.

They are registered on the `rsd` group in `rsd/cli.py`; heavy modules are imported inside the commands so
`rsd --help` stays fast.

Usage:
    rsd generate-demos --episodes 200 --out runs/demo/demos.hdf5
    rsd generate-demos --env libero:libero_spatial --tasks 0,1 --episodes 30 --workers 2 --out runs/libero/demos.hdf5
    rsd check-expert --env libero:libero_spatial --trials 50 --workers 2
    rsd eval --policy runs/demo/policy --bundle runs/demo/bundle --episodes 50 --json runs/demo/eval.json
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("generate-demos")
@click.option("--env", "env_name", default="tabletop", show_default=True, help="tabletop, robosuite:<Task> or libero:<suite>.")
@click.option("--episodes", default=200, show_default=True, help="Expert episodes to run (per task for libero; failures are dropped).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HDF5 file to write (LIBERO layout).")
@click.option("--seed", default=0, show_default=True, help="First seed (episodes use seed .. seed+episodes-1).")
@click.option("--image-size", default=64, show_default=True, help="Side of the rendered camera frames.")
@click.option("--task-family", default="any", show_default=True, type=click.Choice(["any", "pick_place", "next_to"]), help="Tabletop task family.")
@click.option("--tasks", default=None, help="libero: task ids of the suite, e.g. 0,1 or 0-9 (default: all).")
@click.option("--workers", default=1, show_default=True, help="libero: episodes run in this many processes.")
@click.option("--libero-assets", type=click.Path(exists=True, file_okay=False), default=None,
              help="libero: scene assets folder (default: RSD_LIBERO_ASSETS, then the installed assets wheels).")
def generate_demos_command(env_name: str, episodes: int, out: str, seed: int, image_size: int, task_family: str, tasks: str | None,
                           workers: int, libero_assets: str | None) -> None:
    """Write scripted-expert demonstrations to an HDF5 file (libero: resumable, one shard per episode)."""
    from rsd.data.demos import generate_demos

    libero = env_name.startswith("libero:")
    if not libero and (tasks or workers != 1 or libero_assets):
        raise click.BadParameter(f"--tasks, --workers and --libero-assets apply to libero:* environments, got --env {env_name}.")
    options = {"tasks": _ids(tasks, "--tasks"), "workers": workers, "assets": libero_assets}
    summary = generate_demos(env_name, episodes, out, seed=seed, image_size=image_size, task_family=task_family,
                             libero_options=options if libero else None)
    if libero:
        click.echo("per task (kept, failed): " + ", ".join(f"{t}: {k}/{f}" for t, (k, f) in summary["per_task"].items()))
    click.echo(
        f"wrote {summary['episodes']} episodes ({summary['failed']} failed, dropped) to {summary['out']}: "
        f"{summary['steps']} steps in {summary['seconds']:.1f} s ({summary['steps_per_second']:.0f} steps/s)"
    )


def _ids(text: str | None, what: str) -> list[int] | None:
    """Comma-separated ints and ranges ("0,3,5-7") as a list; None stays None."""
    if text is None:
        return None
    ids: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            ids.extend(range(int(low), int(high) + 1) if high else [int(low)])
    except ValueError as error:
        raise click.BadParameter(f"{what}: expected comma-separated ints or ranges like 0,3,5-7, got {text!r}.") from error
    return ids


@click.command("check-expert")
@click.option("--env", "env_name", required=True, help="libero:<suite>, e.g. libero:libero_spatial.")
@click.option("--tasks", default=None, help="Task ids, e.g. 0-9 or 0,4 (default: all of the suite).")
@click.option("--trials", default=50, show_default=True, help="Init states 0 .. N-1 of each task (the protocol's trials).")
@click.option("--init", default="suite", show_default=True, type=click.Choice(["suite", "sampled"]), help="Fixed init states or sampled placements.")
@click.option("--workers", default=1, show_default=True, help="Processes running tasks side by side.")
@click.option("--libero-assets", type=click.Path(exists=True, file_okay=False), default=None, help="Scene assets folder (default: found).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write every episode's outcome as JSON.")
def check_expert_command(env_name: str, tasks: str | None, trials: int, init: str, workers: int, libero_assets: str | None,
                         json_path: str | None) -> None:
    """Success rate of the scripted LIBERO expert per task, without rendering (physics only)."""
    from rsd.envs.libero import get_suite
    from rsd.envs.libero_expert import check_expert

    prefix, _, suite = env_name.partition(":")
    if prefix != "libero" or not suite:
        raise click.BadParameter(f"--env: expected libero:<suite>, got {env_name!r}.")
    task_ids = _ids(tasks, "--tasks") or list(range(len(get_suite(suite).tasks)))

    def write(results: dict[int, list[tuple[int, bool, int]]]) -> None:
        if json_path:  # after every job, so an interrupted run keeps what it measured
            Path(json_path).write_text(json.dumps({str(t): [{"trial": a, "success": b, "steps": c} for a, b, c in rows]
                                                   for t, rows in results.items()}, indent=1) + "\n")

    results = check_expert(suite, task_ids, range(trials), workers=workers, init=init, assets=libero_assets, on_result=write)
    click.echo("| task | episodes | successes | mean steps (successes) |\n|---:|---:|---:|---:|")
    for task, rows in results.items():
        wins = [steps for _, ok, steps in rows if ok]
        mean = f"{sum(wins) / len(wins):.0f}" if wins else "-"
        click.echo(f"| {task} | {len(rows)} | {len(wins)} | {mean} |")
    total = sum(len(rows) for rows in results.values())
    wins = sum(ok for rows in results.values() for _, ok, _ in rows)
    click.echo(f"\nexpert on {suite} ({init} init): {wins}/{total} successes ({100 * wins / total:.1f} %)")


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
              help="LIBERO scene assets folder (libero:* environments; default: RSD_LIBERO_ASSETS, then the installed assets wheels).")
@click.option("--workers", default=1, show_default=True, help="Episodes run in this many processes (latency is then not reported).")
def eval_command(policy: str, bundle: str | None, env_name: str, episodes: int, seed: int, video: str | None, video_format: str,
                 device: str | None, engine: str, tau: float | None, json_path: str | None, image_size: int | None,
                 libero_assets: str | None, workers: int) -> None:
    """Closed-loop evaluation of MainOnlyPolicy (and SpeculativePolicy with --bundle) on the same seeds."""
    from rsd.envs.evaluate import evaluate
    from rsd.envs.parallel_eval import PolicySpec, evaluate_parallel
    from rsd.runtime.policy import MainOnlyPolicy, SpeculativePolicy, load_main

    env_kwargs = {k: v for k, v in {"image_size": image_size, "assets": libero_assets}.items() if v is not None}
    if libero_assets and not env_name.startswith("libero:"):
        raise click.BadParameter(f"--libero-assets applies to libero:* environments, got --env {env_name}.")
    if workers <= 0:
        raise click.BadParameter(f"--workers: expected an int > 0, got {workers}.")
    seeds = list(range(seed, seed + episodes))
    reports = {}
    if workers > 1:
        specs = {"baseline": PolicySpec(policy, None, device)}
        if bundle:
            specs["speculative"] = PolicySpec(policy, bundle, device, engine, tau)
        for name, spec in specs.items():
            videos = None if video is None else Path(video) / name
            reports[name] = evaluate_parallel(spec, env_name, seeds, workers, env_kwargs, video_dir=videos, video_format=video_format)
            click.echo(f"## {name}\n\n{reports[name].to_markdown()}")
    else:
        main_model = load_main(policy, device, None)
        policies = {"baseline": MainOnlyPolicy(main_model)}
        if bundle:
            policies["speculative"] = SpeculativePolicy.from_bundle(bundle, main=main_model, engine=engine, tau=tau)
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
