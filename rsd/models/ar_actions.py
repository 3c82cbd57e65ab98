"""OpenVLA's autoregressive action mode for PrismaticVLA: 256-bin action tokens, 7 decoded one at a time per step.

OpenVLA's action tokenizer (`prismatic/vla/action_tokenizer.py`): each dimension of a q01/q99-normalised action in
[-1, 1] is put in one of 256 uniform bins (`np.digitize` over `linspace(-1, 1, 256)`) and bin `b` (1..256) becomes
token id `vocab_size - b`, i.e. the last 256 ids of the tokenizer's vocabulary (Llama-2's 32000, not the 32064 rows
of the padded embedding). Decoding maps an id back to the centre of its bin (255 centres; bin 256 shares the last).
`predict_action` runs the prompt `BOS, patches, prompt, 29871` (PrismaticVLA's "openvla" layout) and generates 7
tokens greedily, each with one pass over a KV cache. rsd restricts the head to those 256 ids (`HFCausalLM` with a
vocabulary slice), so every decoded token is an action bin; a trained OpenVLA puts its argmax there anyway.

`ARActionModel` is the main model in this mode (VLA + bin tokenizer + statistics); the control-loop policy with plain
or speculative decoding is `rsd.runtime.ar_policy.ARActionPolicy`.

Usage:
    model = ARActionModel.load("runs/ar/policy")                         # or ARActionModel.from_openvla(folder, "bridge_orig")
    logits = model.teacher_forced_logits(inputs, local_tokens)           # [B, 7, 256] (training)
    action = model.actions(local_tokens[0].numpy())                      # [7] un-normalised
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rsd.config import VLAConfig, from_dict, to_dict
from rsd.data.stats import DatasetStatistics, read_dataset_statistics, unnormalize, write_dataset_statistics
from rsd.errors import CheckpointError, ConfigError, ShapeError
from rsd.io import FORMAT_VERSION
from rsd.models.vla import PrefixState, PrismaticVLA, VLAInputs

log = logging.getLogger(__name__)

POLICY_FILE = "ar_policy.json"
OPENVLA_TOKENIZER_VOCAB = 32000  # Llama-2's vocabulary; OpenVLA's embedding is padded to 32064 but actions use the last 256 of 32000


@dataclass(frozen=True)
class BinTokenizerConfig:
    """OpenVLA's action tokenizer: `num_bins` uniform bins per dimension on the last ids of a vocabulary."""

    vocab_size: int  # the text tokenizer's vocabulary; action tokens are its last num_bins ids (OpenVLA: 32000)
    num_bins: int = 256  # bins per dimension (OpenVLA: 256)
    action_dim: int = 7  # tokens per action (OpenVLA: 7)

    def __post_init__(self) -> None:
        if not isinstance(self.num_bins, int) or self.num_bins < 2:
            raise ConfigError(f"BinTokenizerConfig.num_bins: expected an int >= 2, got {self.num_bins!r}.")
        if not isinstance(self.vocab_size, int) or self.vocab_size < self.num_bins:
            raise ConfigError(f"BinTokenizerConfig.vocab_size: expected an int >= num_bins {self.num_bins}, got {self.vocab_size!r}.")
        if not isinstance(self.action_dim, int) or self.action_dim < 1:
            raise ConfigError(f"BinTokenizerConfig.action_dim: expected a positive int, got {self.action_dim!r}.")

    @property
    def token_offset(self) -> int:
        """The first action token id (`vocab_size - num_bins`); the decoder's token t is id `token_offset + t`."""
        return self.vocab_size - self.num_bins


class BinActionTokenizer:
    """OpenVLA's `ActionTokenizer`: normalised actions in [-1, 1] ↔ token ids; `local` ids count from `token_offset`."""

    def __init__(self, config: BinTokenizerConfig) -> None:
        self.config = config
        self.bins = np.linspace(-1.0, 1.0, config.num_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0

    def encode(self, normalized: np.ndarray) -> np.ndarray:
        """Token ids (int64, same shape) of normalised actions: `vocab_size - digitize(clip(a, -1, 1), bins)`."""
        digitized = np.digitize(np.clip(np.asarray(normalized, dtype=np.float64), -1.0, 1.0), self.bins)
        return (self.config.vocab_size - digitized).astype(np.int64)

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        """Normalised actions (float64) of token ids: the centre of bin `vocab_size - id` (clipped to the 255 centres)."""
        index = np.clip(self.config.vocab_size - np.asarray(token_ids, dtype=np.int64) - 1, 0, self.bin_centers.shape[0] - 1)
        return self.bin_centers[index]

    def to_local(self, token_ids: np.ndarray) -> np.ndarray:
        """Local ids 0 .. num_bins-1 of action token ids (adjacent local ids are adjacent bins)."""
        local = np.asarray(token_ids, dtype=np.int64) - self.config.token_offset
        if local.size and (local.min() < 0 or local.max() >= self.config.num_bins):
            raise ShapeError(f"BinActionTokenizer: expected action token ids in {self.config.token_offset}..{self.config.vocab_size - 1}, "
                             f"got {np.asarray(token_ids).min()}..{np.asarray(token_ids).max()}.")
        return local

    def from_local(self, local: np.ndarray) -> np.ndarray:
        """Action token ids of local ids."""
        return np.asarray(local, dtype=np.int64) + self.config.token_offset


def ar_vla_config(base: VLAConfig, prompt_end_id: int = 3) -> VLAConfig:
    """A VLAConfig in OpenVLA's autoregressive layout ("openvla": no proprio, no query summary) from another (e.g. the tiny preset's).

    `prompt_end_id` stands in for OpenVLA's 29871 in small vocabularies (3 is the built-in tokenizers' unused id).
    """
    return dataclasses.replace(base, layout="openvla", proprio_dim=0, prompt_end_id=prompt_end_id, query_summary=False)


class ARActionModel:
    """A PrismaticVLA in OpenVLA's action mode: observation inputs → prefix embeddings → 7 action tokens → action."""

    def __init__(self, vla: PrismaticVLA, tokenizer: BinActionTokenizer, statistics: DatasetStatistics, dataset_key: str,
                 fingerprint: str = "unsaved") -> None:
        config = vla.config
        if config.layout != "openvla":
            raise ConfigError(f"ARActionModel: expected a VLA with layout 'openvla' (OpenVLA's sequence), got {config.layout!r}; "
                              "build it with ar_vla_config().")
        if tokenizer.config.vocab_size > config.llm.vocab_size:
            raise ShapeError(f"ARActionModel: the action tokenizer's vocabulary ({tokenizer.config.vocab_size}) exceeds the LM's "
                             f"{config.llm.vocab_size} rows.")
        if statistics.action.dim != tokenizer.config.action_dim:
            raise ShapeError(f"ARActionModel: statistics have {statistics.action.dim} action dims, the tokenizer {tokenizer.config.action_dim}.")
        self.vla = vla
        self.tokenizer = tokenizer
        self.statistics = statistics
        self.dataset_key = dataset_key
        self.fingerprint = fingerprint

    @property
    def action_dim(self) -> int:
        """A: tokens per action."""
        return self.tokenizer.config.action_dim

    def prefix(self, inputs: VLAInputs) -> torch.Tensor:
        """Prefix embeddings `[1, S, D]` of one observation: BOS, patches, prompt, the prompt-end id (OpenVLA's sequence)."""
        if inputs.batch_size != 1 or not bool(inputs.text_mask.all()):
            raise ShapeError(f"ARActionModel.prefix: expected one unpadded observation, got batch {inputs.batch_size}.")
        return self.vla.embed(inputs).hidden

    def teacher_forced_state(self, inputs: VLAInputs, local_tokens: torch.Tensor) -> PrefixState:
        """The layer-0 state of `prefix + first A-1 action tokens` for a batch, readout at the A predicting positions.

        `local_tokens [B, A]` are action tokens (local ids). Prompts may be right-padded: padding is masked as keys
        and position ids skip it, so every row equals its own unpadded KV-cached decoding.
        """
        state = self.vla.embed(inputs)
        batch, length = state.hidden.shape[:2]
        count = self.action_dim - 1
        if tuple(local_tokens.shape) != (batch, self.action_dim):
            raise ShapeError(f"ARActionModel: expected action tokens [{batch}, {self.action_dim}], got {tuple(local_tokens.shape)}.")
        device = state.hidden.device
        embeds = self.vla.language_model.model.embed_tokens(local_tokens[:, :count].to(device) + self.tokenizer.config.token_offset)
        hidden = torch.cat([state.hidden, embeds.to(state.hidden.dtype)], dim=1)
        fixed = length - inputs.text_mask.shape[1]  # BOS and patches precede the prompt
        valid = torch.cat([torch.ones(batch, fixed, dtype=torch.bool, device=device), inputs.text_mask.to(device),
                           torch.ones(batch, count, dtype=torch.bool, device=device)], dim=1)
        total = length + count
        allowed = torch.ones(total, total, dtype=torch.bool, device=device).tril().unsqueeze(0) & valid.unsqueeze(1)
        allowed = allowed | torch.eye(total, dtype=torch.bool, device=device).unsqueeze(0)
        dtype = hidden.dtype
        mask = torch.zeros(batch, 1, total, total, dtype=dtype, device=device).masked_fill(~allowed.unsqueeze(1), torch.finfo(dtype).min)
        position_ids = (valid.cumsum(dim=1) - 1).clamp_min(0)
        rotary = self.vla.language_model.model.rotary_emb(hidden, position_ids=position_ids)
        readout = torch.cat([state.readout, length + torch.arange(count, device=device).expand(batch, -1)], dim=1)
        return PrefixState(hidden=hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary, layer=0, readout=readout)

    def teacher_forced_logits(self, inputs: VLAInputs, local_tokens: torch.Tensor) -> torch.Tensor:
        """Action logits `[B, A, 256]`: position a predicts token a given the prefix and tokens `< a` (training, validation)."""
        hidden = self.vla.final_readout(self.teacher_forced_state(inputs, local_tokens))
        config = self.tokenizer.config
        weight = self.vla.language_model.lm_head.weight[config.token_offset : config.token_offset + config.num_bins]
        return F.linear(hidden, weight)

    def actions(self, local_tokens: np.ndarray) -> np.ndarray:
        """Un-normalised actions `[..., A]` (float32) of local action tokens `[..., A]`."""
        normalized = self.tokenizer.decode(self.tokenizer.from_local(local_tokens))
        return unnormalize(torch.as_tensor(normalized, dtype=torch.float64), self.statistics.action).float().numpy()

    def save(self, directory: str | Path) -> str:
        """Write `vla/`, `dataset_statistics.json` and `ar_policy.json` (tokenizer, dataset key, fingerprint)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vla.save_pretrained(directory / "vla")
        write_dataset_statistics(directory / "dataset_statistics.json", {self.dataset_key: self.statistics})
        self.fingerprint = _fingerprint(directory, self.tokenizer.config, self.dataset_key)
        manifest = {"kind": "ar_policy", "format_version": FORMAT_VERSION, "tokenizer": to_dict(self.tokenizer.config),
                    "dataset_key": self.dataset_key, "fingerprint": self.fingerprint}
        (directory / POLICY_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return self.fingerprint

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ARActionModel:
        """Load a folder written by `save`, checking the fingerprint."""
        directory = Path(directory)
        manifest_file = directory / POLICY_FILE
        if not manifest_file.is_file():
            raise CheckpointError(f"{manifest_file}: expected an AR policy folder written by `rsd train-ar-policy`, found no file.")
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("kind") != "ar_policy" or manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{manifest_file}: expected kind 'ar_policy' format {FORMAT_VERSION}, got {manifest.get('kind')!r} "
                                  f"format {manifest.get('format_version')!r}.")
        tokenizer_config = from_dict(BinTokenizerConfig, manifest["tokenizer"])
        fingerprint = _fingerprint(directory, tokenizer_config, manifest["dataset_key"])
        if fingerprint != manifest["fingerprint"]:
            raise CheckpointError(f"{directory}: expected fingerprint {manifest['fingerprint']}, got {fingerprint}; a file changed.")
        vla = PrismaticVLA.from_pretrained(directory / "vla", device=device, dtype=dtype)
        statistics = read_dataset_statistics(directory / "dataset_statistics.json", manifest["dataset_key"])
        return cls(vla, BinActionTokenizer(tokenizer_config), statistics, manifest["dataset_key"], fingerprint)

    @classmethod
    def from_openvla(cls, path: str | Path, unnorm_key: str, device: str | torch.device | None = None,
                     dtype: str | torch.dtype | None = None, tokenizer_vocab: int = OPENVLA_TOKENIZER_VOCAB, **options: Any) -> ARActionModel:
        """An original OpenVLA checkpoint folder in its own action mode, with the statistics of `unnorm_key`.

        `options` go to `rsd.models.openvla.load_openvla` (e.g. `vision_overrides` for shrunken test checkpoints).
        """
        from rsd.models.openvla import load_openvla, read_hf_config, read_openvla_statistics

        bins = int(read_hf_config(path).get("n_action_bins", 256))
        vla = load_openvla(path, variant="openvla", device=device, dtype=dtype, **options)
        statistics, source = read_openvla_statistics(path)
        if unnorm_key not in statistics:
            raise CheckpointError(f"{source}: expected statistics for unnorm_key {unnorm_key!r}, found {sorted(statistics)}.")
        weights = json.dumps(sorted(p.name for p in Path(path).glob("*.safetensors")))
        fingerprint = hashlib.sha256(f"{Path(path).resolve()}|{weights}".encode()).hexdigest()
        config = BinTokenizerConfig(vocab_size=tokenizer_vocab, num_bins=bins, action_dim=statistics[unnorm_key].action.dim)
        return cls(vla, BinActionTokenizer(config), statistics[unnorm_key], unnorm_key, fingerprint)


def _fingerprint(directory: Path, tokenizer: BinTokenizerConfig, dataset_key: str) -> str:
    """One sha256 over the VLA weights' recorded hash, the statistics file and the tokenizer config."""
    vla_manifest = directory / "vla" / "model.json"
    statistics_file = directory / "dataset_statistics.json"
    for file in (vla_manifest, statistics_file):
        if not file.is_file():
            raise CheckpointError(f"{file}: expected this part of the AR policy folder, found no file.")
    weights = json.loads(vla_manifest.read_text())["weights_sha256"]
    statistics = hashlib.sha256(statistics_file.read_bytes()).hexdigest()
    return hashlib.sha256(f"{weights}|{statistics}|{json.dumps(to_dict(tokenizer), sort_keys=True)}|{dataset_key}".encode()).hexdigest()
