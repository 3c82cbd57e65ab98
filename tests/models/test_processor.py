"""The processor: TensorFlow's centre crop reproduced, observation dicts turned into batches, one error type for bad input.

Expected crop values are worked by hand from OpenVLA-OFT's evaluation code: `tf.image.crop_and_resize` samples the
box corner-aligned and bilinearly, and `convert_image_dtype` truncates `x * 255.5`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsd.errors import DataError, ObservationError, ShapeError
from rsd.models.processor import VLAProcessor, center_crop, observation_batch
from rsd.presets import get_preset


def test_center_crop_matches_tf_crop_and_resize_by_hand() -> None:
    # Columns 0, 100, 200. Area 0.25 -> side 0.5, offset 0.25 -> samples at 0.5, 1.0, 1.5 -> 50, 100, 150;
    # convert_image_dtype: trunc(v / 255 * 255.5) keeps 50, 100, 150.
    image = torch.zeros(1, 3, 3, 3)
    image[..., 1], image[..., 2] = 100 / 255, 200 / 255
    out = center_crop(image, requantize=True, area=0.25)
    assert torch.round(out[0, 0] * 255).tolist() == [[50.0, 100.0, 150.0]] * 3


def test_center_crop_default_is_oft_90_percent_of_the_area() -> None:
    size = 16
    ramp = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size).expand(1, 3, size, size) / (size - 1)
    side = 0.9**0.5
    columns = (1 - side) / 2 + torch.arange(size) * side / (size - 1)  # tf: x1 * (W-1) + j * (x2-x1) * (W-1)/(w-1), over W-1
    torch.testing.assert_close(center_crop(ramp, requantize=False)[0, 0, 0], columns, atol=1e-6, rtol=0)
    torch.testing.assert_close(center_crop(ramp, requantize=True)[0, 0, 0], torch.floor(columns * 255.5) / 255, atol=1e-6, rtol=0)


def test_center_crop_of_the_whole_area_is_identity() -> None:
    image = torch.randint(0, 256, (2, 3, 16, 16)).float() / 255
    assert torch.equal(torch.round(center_crop(image, requantize=True, area=1.0) * 255), torch.round(image * 255))
    with pytest.raises(ObservationError, match="area"):
        center_crop(image, requantize=True, area=0.0)


def test_crop_is_applied_once_when_the_config_asks() -> None:
    import dataclasses

    config = get_preset("tiny").model
    images = np.random.default_rng(0).integers(0, 256, (1, 1, 64, 64, 3), dtype=np.uint8)
    plain = VLAProcessor(config).images(images)
    cropped = VLAProcessor(dataclasses.replace(config, center_crop=True)).images(images)
    by_hand = center_crop(torch.from_numpy(images).permute(0, 1, 4, 2, 3).flatten(0, 1).float() / 255, requantize=True)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (config.vision[0].mean, config.vision[0].std))
    torch.testing.assert_close(cropped[0], (by_hand - mean) / std)
    assert not torch.allclose(plain, cropped)


def test_observation_dict_becomes_a_batch_of_one() -> None:
    frame = np.zeros((64, 64, 3), np.uint8)
    images, instructions, proprio = observation_batch({"image": frame, "instruction": "pick", "proprio": np.ones(8)}, proprio_dim=8)
    assert images.shape == (1, 1, 64, 64, 3) and instructions == ["pick"] and proprio.shape == (1, 8) and proprio.dtype == np.float32
    images, _, proprio = observation_batch({"image": [frame, frame], "instruction": "pick", "proprio": np.ones(8)}, proprio_dim=0)
    assert images.shape == (1, 2, 64, 64, 3) and proprio is None
    with pytest.raises(ObservationError, match="one size"):
        observation_batch({"image": [frame, frame[:32]], "instruction": "pick"}, proprio_dim=0)


def test_bad_input_is_one_error_type_for_observations_and_batches() -> None:
    processor = VLAProcessor(get_preset("tiny").model)
    images = np.zeros((1, 1, 64, 64, 3), np.uint8)
    for call in (lambda: processor(images, ["  "], torch.zeros(1, 8)), lambda: processor(images, ["pick"], torch.zeros(1, 5)),
                 lambda: processor(images[..., :2], ["pick"], torch.zeros(1, 8)), lambda: observation_batch([], proprio_dim=0),
                 lambda: processor(np.array([[None]]), ["pick"], torch.zeros(1, 8))):
        with pytest.raises(ObservationError) as info:
            call()
        assert isinstance(info.value, DataError) and isinstance(info.value, ShapeError)
