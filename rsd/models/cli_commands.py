"""Click commands of the models package (registered in `rsd.cli`): a thin layer over library functions.

`inspect-main` answers "what main model is in this folder?" before a long load: variant (openvla, oft or an rsd
policy), dimensions, stored dtype and the statistics keys, read from config files and safetensors headers only.

Usage:
    rsd inspect-main ckpt/openvla-7b-oft-finetuned-libero-spatial
"""

from __future__ import annotations

import json

import click

from rsd.models.openvla import inspect_main_folder


@click.command("inspect-main")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def inspect_main_command(path: str) -> None:
    """Print variant, dims, dtype and statistics keys of an OpenVLA/OFT folder or an rsd policy folder PATH as JSON."""
    click.echo(json.dumps(inspect_main_folder(path), indent=2))
