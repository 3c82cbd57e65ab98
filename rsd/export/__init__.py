"""Export: the draft and decoder compiled to ONNX / TorchScript / TensorRT, parity-checked, in a hashed bundle.

Usage:
    from rsd.export import export_draft, verify_bundle
    export_draft("runs/demo/draft_k3", "runs/demo/tokenizer", "runs/demo/bundle", formats=("onnx", "torchscript"))
    manifest = verify_bundle("runs/demo/bundle")
"""

from rsd.export.bundle import format_manifest, read_manifest, verify_bundle
from rsd.export.exporter import export_draft

__all__ = ["export_draft", "format_manifest", "read_manifest", "verify_bundle"]
