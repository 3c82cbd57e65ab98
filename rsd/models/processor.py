"""The processor: observations → model inputs, with the one validator and the one centre crop of rsd.

Images are checked (uint8 `[B, N, H, W, 3]`, or float `[B, N, 3, S, S]` in [0, 1]), resized when the config allows
it, centre-cropped when the config says so (OpenVLA-OFT's crop, `VLAConfig.center_crop`) and normalised once per
backbone (OpenVLA's 6-channel input for two backbones); instructions are formatted into the prompt template and
tokenised (right-padded); proprio is checked. Training, feature collection and the runtime all go through this,
so a model sees at run time exactly the transform it was trained with (docs/pitfalls.md #10). The crop is the
model's, never the environment's: an environment hands over frames as they are, and the model's config decides.

Usage:
    processor = VLAProcessor(get_preset("tiny").model)
    inputs = processor(images, ["pick up the red block"], proprio)     # images uint8 [B, N, H, W, 3] -> VLAInputs (CPU)
    images, instructions, proprio = observation_batch(obs, proprio_dim=8)   # a control-loop dict -> a batch of one
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rsd.config import VLAConfig
from rsd.errors import ObservationError
from rsd.models.text import TextTokenizer, load_text_tokenizer

CROP_AREA = 0.9  # OpenVLA/OFT's center crop keeps 90 % of the image area


@dataclass
class VLAInputs:
    """Model inputs for a batch of observations (what `VLAProcessor` builds)."""

    pixel_values: torch.Tensor  # [B, N, 3 * backbones, S, S] float, normalised per backbone (OpenVLA's 6-channel input)
    input_ids: torch.Tensor  # [B, T] int64 prompt ids, right-padded
    text_mask: torch.Tensor  # [B, T] bool, true at real prompt tokens
    proprio: torch.Tensor | None = None  # [B, P] normalised proprio, or None

    @property
    def batch_size(self) -> int:
        """B."""
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> VLAInputs:
        """The same inputs on `device`."""
        return VLAInputs(
            pixel_values=self.pixel_values.to(device),
            input_ids=self.input_ids.to(device),
            text_mask=self.text_mask.to(device),
            proprio=None if self.proprio is None else self.proprio.to(device),
        )

    def pad_prompt(self, length: int, pad_id: int = 0) -> VLAInputs:
        """The same inputs with prompts right-padded to `length` tokens `[B, length]` (static shapes for compiled graphs).

        Padding is masked out as keys and position ids count real tokens only, so every row's result is unchanged
        (to float tolerance) and the pad id's value does not matter. A longer prompt is an ObservationError.
        """
        have = int(self.input_ids.shape[1])
        if have > length:
            raise ObservationError(f"prompt: expected at most {length} tokens (the compiled graphs' static prompt length), got {have}. "
                                   "Shorten the instruction or compile with a larger CompileConfig.prompt_tokens.")
        if have == length:
            return self
        extra = length - have
        ids = F.pad(self.input_ids, (0, extra), value=pad_id)
        mask = F.pad(self.text_mask, (0, extra), value=False)
        return VLAInputs(self.pixel_values, ids, mask, self.proprio)


def center_crop(images: torch.Tensor, requantize: bool, area: float = CROP_AREA) -> torch.Tensor:
    """OpenVLA/OFT's center crop of `[N, 3, S, S]` images in [0, 1]: the central `area` of the image, resized back to S.

    Reproduces `tf.image.crop_and_resize` (bilinear, corner-aligned sampling of the box) as OFT's evaluation uses it;
    with `requantize` the result goes back to uint8 the way TensorFlow converts (`x * 255.5`, truncated), as the
    reference pipeline hands a uint8 image to the processor.
    """
    if not 0.0 < area <= 1.0:
        raise ObservationError(f"center_crop: expected an area in (0, 1], got {area}.")
    size = images.shape[-1]
    side = math.sqrt(area)
    offset = (1.0 - side) / 2.0
    steps = torch.arange(size, dtype=torch.float32, device=images.device)
    coords = 2.0 * (offset + steps * side / (size - 1)) - 1.0  # align_corners=True grid of the box
    grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
    grid = torch.stack([grid_x, grid_y], dim=-1).expand(images.shape[0], -1, -1, -1)
    cropped = F.grid_sample(images, grid, mode="bilinear", align_corners=True)
    if requantize:
        cropped = torch.floor((cropped.clamp(0.0, 1.0) * 255.5).clamp(max=255.0)) / 255.0
    return cropped


def observation_batch(obs: dict[str, Any], proprio_dim: int) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """One control-loop observation dict as a batch of one: images `[1, N, H, W, 3]`, `[instruction]`, proprio `[1, P]`.

    Only the dict's structure is checked here (keys, one frame or a list of frames of one size); the content is
    checked by `VLAProcessor` like any batch. Proprio is read only when the model takes it (`proprio_dim > 0`).
    """
    if not isinstance(obs, dict):
        raise ObservationError(f"observation: expected a dict with 'image' and 'instruction', got {type(obs).__name__}.")
    missing = [k for k in ("image", "instruction") if k not in obs]
    if missing:
        raise ObservationError(f"observation: expected keys 'image' and 'instruction', missing {missing}.")
    raw = obs["image"]
    frames = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    arrays = [frame.cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame) for frame in frames]
    if len({a.shape for a in arrays}) != 1:
        raise ObservationError(f"observation['image']: expected cameras of one size, got {[a.shape for a in arrays]}.")
    proprio = None
    if proprio_dim > 0 and obs.get("proprio") is not None:
        proprio = np.asarray(obs["proprio"], dtype=np.float32)[None]
    return np.stack(arrays)[None], [obs["instruction"]], proprio


class VLAProcessor:
    """Images, instructions and proprio of a batch → `VLAInputs` for `PrismaticVLA` (on the CPU)."""

    def __init__(self, config: VLAConfig, text_tokenizer: TextTokenizer | None = None) -> None:
        self.config = config
        self._text_tokenizer = text_tokenizer

    @property
    def text_tokenizer(self) -> TextTokenizer:
        """The prompt tokenizer named by the config (built on first use)."""
        if self._text_tokenizer is None:
            self._text_tokenizer = load_text_tokenizer(self.config.text_tokenizer, self.config.llm.vocab_size)
        return self._text_tokenizer

    @property
    def bos_id(self) -> int:
        """The BOS id (1 for the built-in tokenizers and Llama's) without loading a tokenizer when none is set."""
        return 1 if not self.config.text_tokenizer else self.text_tokenizer.bos_id

    def images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 `[B, N, H, W, 3]` (or float `[B, N, 3, S, S]` in [0, 1]) → normalised `[B, N, 3 * backbones, S, S]`."""
        config = self.config
        size = config.image_size
        if isinstance(images, torch.Tensor):
            tensor = images
        else:
            array = np.ascontiguousarray(images)
            if array.dtype.kind not in "biufc":  # objects (None), strings: no tensor holds them; numbers meet the dtype check below
                raise ObservationError(f"VLAProcessor: expected images of numbers, got an array of dtype {array.dtype} {array.shape}.")
            tensor = torch.from_numpy(array)
        if tensor.ndim != 5 or tensor.shape[1] != config.num_images:
            raise ObservationError(f"VLAProcessor: expected images [B, {config.num_images}, H, W, 3] (uint8) or "
                                   f"[B, {config.num_images}, 3, S, S] (float), {config.num_images} camera image(s) per row, "
                                   f"got {tuple(tensor.shape)}.")
        from_uint8 = tensor.dtype == torch.uint8
        if from_uint8:
            if tensor.shape[-1] != 3:
                raise ObservationError(f"VLAProcessor: expected uint8 images [B, N, H, W, 3] (frames [H, W, 3]), got {tuple(tensor.shape)}.")
            tensor = tensor.permute(0, 1, 4, 2, 3).float() / 255.0
        elif not tensor.dtype.is_floating_point or tensor.shape[2] != 3:
            raise ObservationError(f"VLAProcessor: expected uint8 [B, N, H, W, 3] or float [B, N, 3, S, S] images, "
                                   f"got {tensor.dtype} {tuple(tensor.shape)}.")
        batch, cams, _, height, width = tensor.shape
        if (height, width) != (size, size):
            if not config.resize_images:
                raise ObservationError(f"VLAProcessor: expected {size}×{size} images, got {height}×{width}; "
                                       "resize them or set resize_images.")
            tensor = F.interpolate(tensor.flatten(0, 1).float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            tensor = tensor.reshape(batch, cams, 3, size, size)
        if config.center_crop:
            tensor = center_crop(tensor.flatten(0, 1).float(), requantize=from_uint8).reshape(batch, cams, 3, size, size)
        channels = []
        for vit in config.vision:
            mean = torch.tensor(vit.mean).view(1, 1, 3, 1, 1)
            std = torch.tensor(vit.std).view(1, 1, 3, 1, 1)
            channels.append((tensor.float() - mean) / std)
        return torch.cat(channels, dim=2)

    def prompts(self, instructions: list[str], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt ids `[B, T]` (right-padded) and their mask `[B, T]` for one instruction per row."""
        if not isinstance(instructions, (list, tuple)) or len(instructions) != batch:
            raise ObservationError(f"VLAProcessor: expected {batch} instructions (one per image row), got {instructions!r}.")
        for instruction in instructions:
            if not isinstance(instruction, str) or not instruction.strip():
                raise ObservationError(f"VLAProcessor: expected non-empty instruction strings, got {instruction!r}.")
        prompts = [self.text_tokenizer.encode(self.config.prompt_template.format(instruction=i.strip().lower())) for i in instructions]
        if self.config.layout != "rsd":  # OpenVLA's predict_action appends 29871 unless the prompt already ends with it
            end = self.config.prompt_end_id
            prompts = [p if p and p[-1] == end else [*p, end] for p in prompts]
        length = max(len(p) for p in prompts)
        input_ids = torch.full((batch, length), self.text_tokenizer.pad_id, dtype=torch.int64)
        text_mask = torch.zeros(batch, length, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            input_ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
            text_mask[row, : len(prompt)] = True
        return input_ids, text_mask

    def proprio(self, proprio: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Proprio `[B, P]` as float32, checked against the config (None when the model takes none)."""
        dim = self.config.proprio_dim
        if dim == 0:
            if proprio is not None:
                raise ObservationError("VLAProcessor: this model takes no proprio (proprio_dim 0), got a proprio tensor.")
            return None
        if proprio is None or tuple(proprio.shape) != (batch, dim) or not torch.isfinite(proprio).all():
            got = None if proprio is None else tuple(proprio.shape)
            raise ObservationError(f"VLAProcessor: expected finite proprio [{batch}, {dim}], got {got}.")
        return proprio.float()

    def __call__(self, images: np.ndarray | torch.Tensor, instructions: list[str], proprio: torch.Tensor | None = None) -> VLAInputs:
        """Inputs from images `[B, N, H, W, 3]`, B instructions and normalised proprio `[B, P]`."""
        pixel_values = self.images(images)
        batch = pixel_values.shape[0]
        input_ids, text_mask = self.prompts(instructions, batch)
        return VLAInputs(pixel_values, input_ids, text_mask, self.proprio(proprio, batch))

    def random_inputs(self, batch: int = 1, prompt_len: int = 24, seed: int = 0) -> VLAInputs:
        """Random images and prompt ids of the model's shapes (latency work without a text tokenizer)."""
        generator = torch.Generator().manual_seed(seed)
        size, cams = self.config.image_size, self.config.num_images
        images = torch.randint(0, 256, (batch, cams, size, size, 3), generator=generator, dtype=torch.uint8)
        ids = torch.randint(3, self.config.llm.vocab_size, (batch, prompt_len), generator=generator)
        if self.config.layout != "rsd":
            ids[:, -1] = self.config.prompt_end_id
        proprio = torch.zeros(batch, self.config.proprio_dim) if self.config.proprio_dim else None
        return VLAInputs(self.images(images), ids, torch.ones(batch, prompt_len, dtype=torch.bool), proprio)
