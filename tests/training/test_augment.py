"""DrQ random shift: images move by at most `pad` pixels, rows keep their identity, labels are untouched."""

from __future__ import annotations

import numpy as np
import pytest

from rsd.errors import ShapeError
from rsd.training.augment import random_shift


def test_each_frame_is_a_shifted_crop_of_its_own_edge_padded_frame():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 2, 16, 16, 3), dtype=np.uint8)
    shifted = random_shift(images, pad=3, rng=np.random.default_rng(1))
    assert shifted.shape == images.shape and shifted.dtype == np.uint8
    for b in range(6):
        for c in range(2):
            padded = np.pad(images[b, c], ((3, 3), (3, 3), (0, 0)), mode="edge")
            matches = [(dy, dx) for dy in range(7) for dx in range(7) if np.array_equal(padded[dy : dy + 16, dx : dx + 16], shifted[b, c])]
            assert matches, f"frame {b}, camera {c} is not a crop of its own padded frame"
    assert not np.array_equal(shifted, images)


def test_rows_keep_their_identity_and_zero_pad_is_identity():
    images = np.stack([np.full((1, 8, 8, 3), row, dtype=np.uint8) for row in range(5)])  # row i is all i
    shifted = random_shift(images, pad=2, rng=np.random.default_rng(0))
    assert all((shifted[row] == row).all() for row in range(5))
    assert random_shift(images, pad=0, rng=np.random.default_rng(0)) is images
    same_a = random_shift(images * 3, pad=2, rng=np.random.default_rng(7))
    same_b = random_shift(images * 3, pad=2, rng=np.random.default_rng(7))
    assert np.array_equal(same_a, same_b)


def test_bad_input_is_refused():
    with pytest.raises(ShapeError, match=r"\[B, N, H, W, 3\]"):
        random_shift(np.zeros((2, 8, 8, 3), dtype=np.uint8), pad=2, rng=np.random.default_rng(0))
