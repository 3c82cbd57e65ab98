"""rsd: residual speculative decoding for OpenVLA-class robot policies (early-exit draft + lean runtime)."""

__version__ = "0.1.0"
