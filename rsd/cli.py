"""The `rsd` command line: a thin click layer over library functions with the same options.

Usage:
    rsd --help
    rsd presets tiny
"""

from __future__ import annotations

import json
import logging

import click

from rsd.config import get_preset, to_dict
from rsd.errors import RsdError


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
