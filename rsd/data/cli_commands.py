"""Command-line pieces for data: the options that map a dataset's keys (shared by every command reading `--data`) and `convert`.

Usage:
    rsd train-policy --data data/libero_lerobot --camera image --camera wrist_image --image-size 64 ...
    rsd convert --to lerobot --data runs/demo/demos.hdf5 --out runs/demo/lerobot
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

from rsd.data.source import IMAGE_CONVENTIONS, STATISTICS, DataSource
from rsd.data.video import VIDEO_SETTINGS


def data_source_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add `--data` and the key-mapping options to a command; it receives them as one `data: DataSource`."""

    @functools.wraps(function)
    def wrapper(*args: Any, data: str, camera: tuple[str, ...], state_key: tuple[str, ...], no_state: bool, action_key: str | None,
                instruction: str | None, image_size: int | None, image_convention: str, stats: str, **kwargs: Any) -> Any:
        if no_state and state_key:
            raise click.BadParameter("give --state-key or --no-state, not both", param_hint="--no-state")
        proprio_keys = () if no_state else (state_key or None)
        source = DataSource(data, cameras=camera or None, proprio_keys=proprio_keys, action_key=action_key, instruction=instruction,
                            image_size=image_size, image_convention=image_convention, statistics=stats)
        return function(*args, data=source, **kwargs)

    options = [
        click.option("--data", required=True, type=click.Path(exists=True),
                     help="LeRobotDataset folder (v3.0 or v2.x) or robomimic/LIBERO HDF5 file."),
        click.option("--camera", multiple=True, help="Camera to load (repeat for several; LeRobot key or name, HDF5 name). Default: all."),
        click.option("--state-key", multiple=True, help="Key concatenated into proprio (repeat). Default: observation.state / LIBERO's."),
        click.option("--no-state", is_flag=True, help="Load no proprio."),
        click.option("--action-key", default=None, help="Action key (default: action for LeRobot, actions for HDF5)."),
        click.option("--instruction", default=None, help="Instruction for every episode (default: the dataset's task strings)."),
        click.option("--image-size", type=int, default=None, help="Resize frames to this square size (default: as stored)."),
        click.option("--image-convention", type=click.Choice(IMAGE_CONVENTIONS), default="auto", show_default=True,
                     help="opengl: frames stored upside down (rotated 180° on reading); auto: HDF5 attr, LeRobot upright."),
        click.option("--stats", type=click.Choice(STATISTICS), default="dataset", show_default=True,
                     help="dataset: the dataset's own q01/q99 when it has them; train: from the training episodes."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@click.command("convert")
@click.option("--to", "to", required=True, type=click.Choice(["lerobot", "hdf5"]), help="Format to write.")
@click.option("--out", required=True, type=click.Path(), help="LeRobot folder or HDF5 file to write.")
@click.option("--fps", default=20, show_default=True, help="Frame rate recorded in the LeRobot metadata.")
@click.option("--video", type=click.Choice(sorted(VIDEO_SETTINGS)), default="high", show_default=True,
              help="high: H.264 4:4:4 CRF 0 (near lossless); lerobot: LeRobot's AV1 CRF 30 (small, lossy).")
@click.option("--robot-type", default=None, help="robot_type written to meta/info.json (HDF5: the env name).")
@data_source_options
def convert_command(data: DataSource, to: str, out: str, fps: int, video: str, robot_type: str | None) -> None:
    """Convert demonstrations between rsd's HDF5 layout and a LeRobot v3.0 dataset folder."""
    from rsd.data.convert import convert

    click.echo(json.dumps(convert(data, out, to, fps=fps, video=video, robot_type=robot_type)))
