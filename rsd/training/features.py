"""collect-features: run the frozen main model over dataset frames and store what the draft learns from.

Per frame: the exit-layer query hidden state (fp16), the main model's coarse-layer logits (fp16), the main
model's tokens for all L layers, the ground-truth tokens of the frame's action chunk, the episode id and the
frame index. Shards of `shard_size` frames are safetensors files listed in `index.json` together with the
main model's fingerprint and the exit layer. A copy of the policy's tokenizer is stored beside the shards, so the
features folder alone suffices for draft training and calibration.

The folder is built in `.OUT.partial` beside `out` (`rsd.io.staged_dir`, resumable) and moved to `out` only when
every shard is written, so `out` never holds a half-made set. An interrupted run leaves the partial folder; the
same command resumes it, skipping finished shards, and refuses to add shards from another main model, exit layer
or dataset (`overwrite=True` discards such a partial folder). An existing features folder at `out` is replaced only
with `overwrite=True`.

Usage:
    rsd collect-features --policy runs/demo/policy --data runs/demo/demos.hdf5 --exit-layer 3 --out runs/demo/features
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from rsd.data.dataset import FrameDataset
from rsd.data.source import DataSource, as_source, read_episodes, source_fingerprint
from rsd.errors import CheckpointError, ConfigError
from rsd.io import FORMAT_VERSION, check_out, read_json, read_manifest, sha256_file, staged_dir
from rsd.models.main import MainModel
from rsd.tokenizer import ActionTokenizer, tokens_to_layers

log = logging.getLogger(__name__)

INDEX = "index.json"


@dataclass
class Features:
    """Every stored frame of a features folder, concatenated."""

    exit_hidden: torch.Tensor  # [N, D] float16 query hidden after `exit_layer` layers
    main_logits: torch.Tensor  # [N, C, H*d, V] float16 main-model logits of the coarse layers
    main_tokens: torch.Tensor  # [N, L, H*d] int64 main-model argmax tokens
    gt_tokens: torch.Tensor  # [N, L, H*d] int64 tokenizer tokens of the ground-truth chunk
    episode_id: torch.Tensor  # [N] int64
    frame_index: torch.Tensor  # [N] int64
    index: dict[str, Any]  # the folder's index.json
    tokenizer: ActionTokenizer  # the main model's tokenizer (copied into the folder)

    @property
    def exit_layer(self) -> int:
        """The exit layer the hidden states come from."""
        return int(self.index["exit_layer"])

    def rows(self, episodes: set[int] | list[int]) -> torch.Tensor:
        """Indices of the frames that belong to `episodes`."""
        wanted = torch.tensor(sorted(set(int(e) for e in episodes)), dtype=torch.int64)
        return torch.nonzero(torch.isin(self.episode_id, wanted)).flatten()


def collect_features(
    policy: str | Path,
    data: str | Path | DataSource,
    exit_layer: int,
    out: str | Path,
    shard_size: int = 2048,
    batch_size: int = 64,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write (or finish an interrupted run of) the features folder `out` for `policy` at `exit_layer` over the frames of `data`."""
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"collect-features --{name.replace('_', '-')}: expected an int >= 1, got {value!r}.")
    main = MainModel.load(policy)
    if not 0 <= exit_layer <= main.num_layers:
        raise ConfigError(f"collect-features --exit-layer: expected an int in 0..{main.num_layers}, got {exit_layer}.")
    check_out(out, "features", overwrite)
    source = as_source(data)
    episodes = read_episodes(source)
    dataset = FrameDataset(episodes, main.tokenizer.config.chunk_len)
    with staged_dir(out, "features", overwrite, resumable=True) as stage:
        computed = _collect(main, dataset, source, exit_layer, stage, shard_size, batch_size, progress, overwrite)
    num_shards = (len(dataset) + shard_size - 1) // shard_size
    return {"frames": len(dataset), "shards": num_shards, "computed_frames": computed, "exit_layer": exit_layer, "out": str(out)}


def _collect(main: MainModel, dataset: FrameDataset, source: DataSource, exit_layer: int, out: Path, shard_size: int, batch_size: int,
             progress: bool, overwrite: bool) -> int:
    """Write every missing shard of the (staging) features folder `out`; return the number of frames computed."""
    total = len(dataset)
    index = _open_index(out, main, exit_layer, source, total, shard_size, overwrite)
    main.tokenizer.save(out / "tokenizer")
    tok = main.tokenizer.config
    num_shards = (total + shard_size - 1) // shard_size
    done = {entry["file"] for entry in index["shards"] if (out / entry["file"]).is_file() and sha256_file(out / entry["file"]) == entry["sha256"]}
    index["shards"] = [entry for entry in index["shards"] if entry["file"] in done]
    start_time, computed = time.perf_counter(), 0
    bar = tqdm(total=total, desc=f"collect-features k={exit_layer}", unit="frame", disable=not progress)
    for shard in range(num_shards):
        name = f"shard_{shard:05d}.safetensors"
        lo, hi = shard * shard_size, min(total, (shard + 1) * shard_size)
        if name in done:
            bar.update(hi - lo)
            continue
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("exit_hidden", "main_logits", "main_tokens", "gt_tokens", "episode_id", "frame_index")}
        for start in range(lo, hi, batch_size):
            batch = dataset.batch(range(start, min(hi, start + batch_size)))
            with torch.inference_mode():
                inputs = main.prepare(batch.images, batch.instructions, batch.proprio)
                state = main.vla.prefix(inputs, exit_layer)
                parts["exit_hidden"].append(state.query_hidden.float().cpu().to(torch.float16))
                logits = main.head(main.vla.resume(state)).float().cpu()
                parts["main_logits"].append(logits[:, : tok.coarse_layers].to(torch.float16))
                parts["main_tokens"].append(logits.argmax(dim=-1).to(torch.uint8))
                gt = main.tokenizer.encode(torch.as_tensor(batch.actions, dtype=torch.float32))
                parts["gt_tokens"].append(tokens_to_layers(gt).to(torch.uint8).cpu())
            parts["episode_id"].append(torch.as_tensor(batch.episode_ids, dtype=torch.int64))
            parts["frame_index"].append(torch.as_tensor(batch.frame_indices, dtype=torch.int64))
            bar.update(len(batch.instructions))
            computed += len(batch.instructions)
            bar.set_postfix(fps=f"{computed / (time.perf_counter() - start_time):.0f}")
        save_file({k: torch.cat(v) for k, v in parts.items()}, str(out / name))
        index["shards"].append({"file": name, "frames": hi - lo, "first_frame": lo, "sha256": sha256_file(out / name)})
        index["shards"].sort(key=lambda e: e["first_frame"])
        _write_index(out, index)
    bar.close()
    index["complete"] = len(index["shards"]) == num_shards
    _write_index(out, index)
    return computed


def _open_index(out: Path, main: MainModel, exit_layer: int, source: DataSource, total: int, shard_size: int,
                overwrite: bool) -> dict[str, Any]:
    """Read the index of an interrupted run (refusing another main model, exit layer or dataset) or start a new one."""
    identity = {
        "main_fingerprint": main.fingerprint,
        "exit_layer": exit_layer,
        "data_sha256": source_fingerprint(source),  # the data and how it is read (cameras, image size, convention, ...)
        "frames": total,
        "shard_size": shard_size,
    }
    path = out / INDEX
    if path.is_file():
        index = read_json(path, "the index of an interrupted collect-features run")
        for key, value in identity.items():
            if index.get(key) == value:
                continue
            if not overwrite:
                raise CheckpointError(
                    f"{path}: this interrupted run holds {key} = {index.get(key)!r}, but this run has {value!r}. Features from "
                    "different main models, exit layers or datasets cannot be mixed: re-run the interrupted command to finish it, "
                    "or pass --overwrite to discard it."
                )
            log.warning("collect-features: discarding the interrupted run in %s (%s = %r, this run has %r)", out, key, index.get(key), value)
            for stale in out.iterdir():
                if stale.is_dir():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
            break
        else:
            return index
    return {
        "kind": "features",
        "format_version": FORMAT_VERSION,
        **identity,
        "hidden_size": main.hidden_size,
        "num_layers": main.num_layers,
        "data": source.path,
        "shards": [],
        "complete": False,
    }


def _write_index(out: Path, index: dict[str, Any]) -> None:
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.replace(out / INDEX)


def load_features(directory: str | Path) -> Features:
    """Load a complete features folder, verifying every shard's sha256."""
    directory = Path(directory)
    path = directory / INDEX
    index = read_manifest(directory, path.stem, kind="features")
    if not index.get("complete"):
        raise CheckpointError(f"{path}: the features folder is incomplete; re-run `rsd collect-features` with the same arguments to finish it.")
    tensors: dict[str, list[torch.Tensor]] = {}
    for entry in index["shards"]:
        file = directory / entry["file"]
        if sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"{file}: expected sha256 {entry['sha256']}, the file changed after it was written.")
        for key, value in load_file(str(file)).items():
            tensors.setdefault(key, []).append(value)
    cat = {k: torch.cat(v) for k, v in tensors.items()}
    return Features(
        exit_hidden=cat["exit_hidden"],
        main_logits=cat["main_logits"],
        main_tokens=cat["main_tokens"].to(torch.int64),
        gt_tokens=cat["gt_tokens"].to(torch.int64),
        episode_id=cat["episode_id"],
        frame_index=cat["frame_index"],
        index=index,
        tokenizer=ActionTokenizer.load(directory / "tokenizer"),
    )


def episode_ids(features: Features) -> np.ndarray:
    """The distinct episode ids of a features set, sorted."""
    return np.unique(features.episode_id.numpy())
