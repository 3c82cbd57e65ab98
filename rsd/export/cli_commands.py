"""Click commands `export-draft` and `inspect`: thin wrappers over `export_draft` and `verify_bundle`.

They are registered on the `rsd` group in `rsd/cli.py`; heavy modules are imported inside the commands so
`rsd --help` stays fast.

Usage:
    rsd export-draft --draft runs/demo/draft_k3 --tokenizer runs/demo/tokenizer --out runs/demo/bundle --formats onnx,torchscript
    rsd inspect runs/demo/bundle
"""

from __future__ import annotations

import click


@click.command("export-draft")
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
    from rsd.export import export_draft

    report = export_draft(draft, tokenizer, out, formats=formats.split(","), precision=precision, calibration=calibration,
                          features=features, dry_run=dry_run, opset=opset, device=device)
    for engine in report["engines"]:
        parity = engine["parity"] or {}
        figures = (f"tokens {100 * parity['token_agreement']:.2f}%, logits max |diff| {parity['logits_max_abs']:.2e}"
                   if "token_agreement" in parity else
                   f"actions max |diff| {parity['actions_max_abs']:.2e}" if parity else engine["reason"])
        seconds = "-" if engine["export_seconds"] is None else f"{engine['export_seconds']:.2f} s"
        click.echo(f"{engine['name']:<12} {engine['format']:<12} {engine['precision']:<5} {seconds:>8} "
                   f"{engine['bytes'] / 1e6:8.2f} MB  {figures}")
    click.echo(f"wrote {report['out']} in {report['seconds']:.1f} s" + ("" if report["calibrated"] else " (not calibrated: tau = inf)"))


@click.command("inspect")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
def inspect_command(bundle: str) -> None:
    """Print a bundle's manifest and re-verify every file hash (non-zero exit on a mismatch)."""
    from rsd.errors import CheckpointError
    from rsd.export import format_manifest, read_manifest, verify_bundle

    click.echo(format_manifest(read_manifest(bundle)))
    try:
        verify_bundle(bundle)
    except CheckpointError as error:
        raise click.ClickException(str(error)) from error
    click.echo("\nall file hashes verified")
