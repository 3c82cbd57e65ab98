"""OpenVLA-OFT's L1 regression action head, with OFT's module and key names, so its `.pt` files load as they are.

OFT decodes a whole chunk in one forward pass: the 56 action hidden states `[B, H*A, D]` (H = 8 steps, A = 7 dims)
are regrouped per step into `[B, H, A*D]` and an MLP-ResNet regresses the normalised action of each step:
LayerNorm → Linear(A*D, D) → ReLU → 2 residual blocks (x + ReLU(Linear(LayerNorm(x)))) → LayerNorm → Linear(D, A).
Key names follow OFT's `L1RegressionActionHead.model` (`layer_norm1`, `fc1`, `mlp_resnet_blocks.{i}.ffn.{0,1}`,
`layer_norm2`, `fc2`); the file's DDP `module.` prefix is removed as OFT's loader does. With it, a main-only
forward (`oft_predict_actions`) reproduces OFT's normalised actions from a loaded checkpoint.

Usage:
    vla = load_openvla(folder, variant="oft", **OFT_LIBERO)          # rsd.models.openvla
    head = load_l1_head(folder, hidden_size=4096)
    actions = oft_predict_actions(vla, head, vla.encode_inputs(images, instructions, proprio))   # [B, 8, 7] in [-1, 1]
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rsd.errors import ConfigError, ShapeError
from rsd.io import load_strict
from rsd.models.openvla import find_component, load_component_state_dict
from rsd.models.processor import VLAInputs
from rsd.models.vla import PrismaticVLA


class MLPResNetBlock(nn.Module):
    """Pre-LayerNorm residual MLP block: `x + ReLU(Linear(LayerNorm(x)))` (OFT's `ffn` Sequential)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., dim]` → `[..., dim]`."""
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """LayerNorm → Linear → ReLU → residual blocks → LayerNorm → Linear (OFT's `MLPResNet`)."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., input_dim]` → `[..., output_dim]`."""
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """OFT's L1 head: action hidden states `[B, H*A, D]` → normalised actions `[B, H, A]`."""

    def __init__(self, hidden_size: int = 4096, chunk_len: int = 8, action_dim: int = 7, num_blocks: int = 2) -> None:
        super().__init__()
        self.hidden_size, self.chunk_len, self.action_dim = hidden_size, chunk_len, action_dim
        self.model = MLPResNet(num_blocks, input_dim=hidden_size * action_dim, hidden_dim=hidden_size, output_dim=action_dim)

    def forward(self, action_hidden: torch.Tensor) -> torch.Tensor:
        """Normalised actions `[B, H, A]` from the final action hidden states `[B, H*A, D]`."""
        expected = (self.chunk_len * self.action_dim, self.hidden_size)
        if action_hidden.ndim != 3 or tuple(action_hidden.shape[1:]) != expected:
            raise ShapeError(f"L1RegressionActionHead: expected action hidden [B, {expected[0]}, {expected[1]}], got {tuple(action_hidden.shape)}.")
        return self.model(action_hidden.reshape(action_hidden.shape[0], self.chunk_len, -1))


def load_l1_head(path: str | Path, hidden_size: int = 4096, chunk_len: int = 8, action_dim: int = 7,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> L1RegressionActionHead:
    """OFT's `action_head--*checkpoint.pt` (a file, or the folder holding exactly one) as an L1 head; keys must match exactly."""
    file = Path(path)
    if file.is_dir():
        file = find_component(file, "action_head")
    tensors = load_component_state_dict(file)
    with torch.device("meta"):
        head = L1RegressionActionHead(hidden_size, chunk_len, action_dim)
    load_strict(head, tensors, file)
    return head.to(device=device, dtype=dtype).eval()


def oft_predict_actions(vla: PrismaticVLA, head: L1RegressionActionHead, inputs: VLAInputs) -> torch.Tensor:
    """OFT's main-only prediction: one full forward, the 56 action hidden states, the L1 head → normalised `[B, H, A]`."""
    if vla.config.num_action_tokens != head.chunk_len * head.action_dim:
        raise ConfigError(f"VLAConfig.num_action_tokens: expected {head.chunk_len * head.action_dim} for this head "
                          f"({head.chunk_len} steps × {head.action_dim} dims), got {vla.config.num_action_tokens}.")
    hidden = vla.action_hidden(vla.embed(inputs))
    return head(hidden.to(next(head.parameters()).dtype))
