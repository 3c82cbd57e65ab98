"""Image augmentation for behaviour cloning: DrQ's random shift (pad, then crop back at a random offset).

Small visuomotor policies trained from scratch overfit the exact pixel positions of a few hundred
demonstrations; shifting every training frame by a few pixels (edge pixels replicated) makes the visual
features rely on relative positions instead, which is what the action depends on. Only images change: the
action chunk of a frame is never touched, and evaluation sees unshifted frames.

Usage:
    rng = np.random.default_rng(0)
    shifted = random_shift(batch.images, pad=4, rng=rng)     # uint8 [B, N, H, W, 3] -> same shape
"""

from __future__ import annotations

import numpy as np

from rsd.errors import ShapeError


def random_shift(images: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Shift each frame of uint8 images `[B, N, H, W, 3]` by up to `pad` pixels in x and y (one offset per frame)."""
    if images.ndim != 5 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ShapeError(f"random_shift: expected uint8 images [B, N, H, W, 3], got {images.dtype} {images.shape}.")
    if pad == 0:
        return images
    batch, cams, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    offsets = rng.integers(0, 2 * pad + 1, size=(batch, cams, 2))
    out = np.empty_like(images)
    for b in range(batch):
        for c in range(cams):
            dy, dx = offsets[b, c]
            out[b, c] = padded[b, c, dy : dy + height, dx : dx + width]
    return out
