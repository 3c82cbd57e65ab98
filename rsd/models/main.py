"""The main model as one saved unit: PrismaticVLA + RFSQ head + action tokenizer + dataset statistics.

A policy folder holds everything needed to turn an observation into an un-normalised action chunk,
so training, feature collection, export and the runtime all use the same input and output transforms
(docs/pitfalls.md #6 and #10):

```
policy/
  policy.json                 fingerprint, dataset key, format version
  vla/model.safetensors + model.json
  head.safetensors + head.json
  tokenizer/tokenizer.safetensors + tokenizer.json
  dataset_statistics.json     OpenVLA layout, {dataset_key: {action, proprio, ...}}
```

Usage:
    main = MainModel.load("runs/demo/policy")
    inputs = main.prepare(images, ["pick up the red block"], proprio)     # images uint8 [B, N, H, W, 3]
    chunk = main.decode_logits(main.head(main.vla(inputs)))               # [B, H, A]
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rsd.config import from_dict, to_dict
from rsd.data.stats import DatasetStatistics, normalize, read_dataset_statistics, write_dataset_statistics
from rsd.errors import CheckpointError, ShapeError
from rsd.io import FORMAT_VERSION, load_artifact, load_strict, read_manifest, save_artifact
from rsd.models.heads import RFSQHead
from rsd.models.processor import VLAInputs
from rsd.models.vla import PrismaticVLA
from rsd.tokenizer import ActionTokenizer, layers_to_tokens

log = logging.getLogger(__name__)

HEAD_FILE = "head"
POLICY_FILE = "policy"  # policy.json: kind, format version, fingerprint, dataset key


def combine_fingerprint(*parts: str) -> str:
    """One sha256 over the weight hashes of a model's parts: the identity drafts and bundles refer to."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


class MainModel(nn.Module):
    """The frozen main policy: observations → exit hidden / full hidden → RFSQ logits → action chunk."""

    def __init__(
        self,
        vla: PrismaticVLA,
        head: RFSQHead,
        tokenizer: ActionTokenizer,
        statistics: DatasetStatistics,
        dataset_key: str,
        fingerprint: str = "unsaved",
    ) -> None:
        super().__init__()
        if statistics.action.dim != tokenizer.config.action_dim:
            raise ShapeError(
                f"MainModel: statistics have {statistics.action.dim} action dims, the tokenizer {tokenizer.config.action_dim}."
            )
        if vla.config.tokenizer != tokenizer.config:
            raise CheckpointError(
                f"MainModel: the VLA's token shape {vla.config.tokenizer} differs from the tokenizer's {tokenizer.config}."
            )
        self.vla = vla
        self.head = head
        self.tokenizer = tokenizer
        self.statistics = statistics
        self.dataset_key = dataset_key
        self.fingerprint = fingerprint

    @property
    def num_layers(self) -> int:
        """LLM layers N."""
        return self.vla.config.llm.num_layers

    @property
    def hidden_size(self) -> int:
        """LLM width D."""
        return self.vla.config.llm.hidden_size

    def prepare(
        self, images: np.ndarray | torch.Tensor, instructions: list[str], proprio: np.ndarray | torch.Tensor | None = None
    ) -> VLAInputs:
        """Model inputs from raw observations; proprio `[B, P]` is checked, then normalised with the dataset statistics."""
        proprio_tensor = None
        if self.vla.config.proprio_dim > 0:
            raw = None if proprio is None else torch.as_tensor(np.asarray(proprio), dtype=torch.float32)
            raw = self.vla.processor.proprio(raw, len(images))
            if self.statistics.proprio is None:
                raise CheckpointError("MainModel.prepare: the model takes proprio but the statistics have none.")
            proprio_tensor, _ = normalize(raw, self.statistics.proprio, warn=False)
        return self.vla.encode_inputs(images, instructions, proprio_tensor)

    def tokens_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Argmax tokens `[B, H, d, c]` from per-layer logits `[B, c, H*d, V]`."""
        tok = self.tokenizer.config
        return layers_to_tokens(logits.argmax(dim=-1), tok.chunk_len, tok.latent_dim)

    def decode_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Un-normalised action chunks `[B, H, A]` from per-layer logits `[B, c, H*d, V]`."""
        return self.tokenizer.decode(self.tokens_from_logits(logits))

    def save(self, directory: str | Path) -> str:
        """Write the policy folder and return its fingerprint."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vla.save_pretrained(directory / "vla")
        save_artifact(
            directory,
            HEAD_FILE,
            self.head.state_dict(),
            {"hidden_size": self.hidden_size, "tokenizer": to_dict(self.tokenizer.config)},
            kind="rfsq_head",
        )
        self.tokenizer.save(directory / "tokenizer")
        write_dataset_statistics(directory / "dataset_statistics.json", {self.dataset_key: self.statistics})
        self.fingerprint = _fingerprint_of(directory)
        policy = {"kind": "policy", "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint, "dataset_key": self.dataset_key}
        (directory / f"{POLICY_FILE}.json").write_text(json.dumps(policy, indent=2) + "\n")
        return self.fingerprint

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MainModel:
        """Load a policy folder written by `save`, verifying every weight hash and the fingerprint."""
        directory = Path(directory)
        policy = read_manifest(directory, POLICY_FILE, kind="policy")
        fingerprint = _fingerprint_of(directory)
        if fingerprint != policy["fingerprint"]:
            raise CheckpointError(f"{directory}: expected fingerprint {policy['fingerprint']}, got {fingerprint}; a weight file changed.")
        vla = PrismaticVLA.from_pretrained(directory / "vla", device=device, dtype=dtype)
        tokenizer = ActionTokenizer.load(directory / "tokenizer")
        tensors, meta = load_artifact(directory, HEAD_FILE, kind="rfsq_head")
        head = RFSQHead(meta["hidden_size"], from_dict(type(tokenizer.config), meta["tokenizer"]))
        load_strict(head, tensors, directory / f"{HEAD_FILE}.safetensors")
        statistics = read_dataset_statistics(directory / "dataset_statistics.json", policy["dataset_key"])
        model = cls(vla, head, tokenizer, statistics, policy["dataset_key"], fingerprint)
        target = next(vla.parameters())
        model.head.to(target.device, target.dtype)
        model.tokenizer.to(target.device)
        log.info("loaded policy %s (fingerprint %s…)", directory, fingerprint[:12])
        return model.eval()

    def describe(self) -> dict[str, Any]:
        """A short JSON-ready description (sizes, fingerprint) for reports."""
        return {
            "fingerprint": self.fingerprint,
            "dataset_key": self.dataset_key,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "parameters": sum(p.numel() for p in self.vla.parameters()) + sum(p.numel() for p in self.head.parameters()),
        }


def _fingerprint_of(directory: Path) -> str:
    """Combine the recorded weight hashes of a policy folder's three parts."""
    parts = []
    for manifest in (directory / "vla" / "model.json", directory / f"{HEAD_FILE}.json", directory / "tokenizer" / "tokenizer.json"):
        if not manifest.is_file():
            raise CheckpointError(f"{manifest}: expected this part of the policy folder, found no file.")
        parts.append(json.loads(manifest.read_text())["weights_sha256"])
    return combine_fingerprint(*parts)
