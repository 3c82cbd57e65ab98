"""Export: the draft and decoder compiled to AOTInductor / ONNX / TorchScript / TensorRT, parity-checked, in a hashed bundle;
the main model's segments for one exit layer as AOTInductor packages (`rsd.export.segments`).

Usage:
    from rsd.bundle import verify_bundle
    from rsd.export import export_draft
    export_draft("runs/demo/draft_k3", "runs/demo/tokenizer", "runs/demo/bundle", formats=("onnx", "torchscript"))
    manifest = verify_bundle("runs/demo/bundle")
"""

from rsd.export.exporter import export_draft

__all__ = ["export_draft"]
