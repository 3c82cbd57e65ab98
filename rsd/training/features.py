"""collect-features: run the frozen main model over dataset frames and store what the draft learns from.

Per frame: the exit-layer query hidden state (fp16), the main model's coarse-layer logits (fp16), the main
model's tokens for all L layers, the ground-truth tokens of the frame's action chunk, the episode id and the
frame index. A shard is a safetensors file of whole consecutive episodes (up to `shard_size` frames, `shard_plan`)
with a JSON record beside it (frames, sha256, the rank that wrote it); `index.json` lists them together with the
main model's fingerprint and the exit layer. A re-run skips every shard whose record and file match and refuses
to add shards from another main model or exit layer. A copy of the policy's tokenizer is stored beside the
shards, so the features folder alone suffices for draft training and calibration.

Under torchrun each rank computes every world_size-th shard of the plan, which does not depend on the number
of ranks, and rank 0 writes the index (with `world_size` and each shard's writer) after a barrier: the union is
the single-process run, frame for frame and bit for bit (each shard is computed in the same batches).

Usage:
    rsd collect-features --policy runs/demo/policy --data runs/demo/demos.hdf5 --exit-layer 3 --out runs/demo/features
    torchrun --nproc-per-node 4 -m rsd.cli collect-features ... --device cuda      # one GPU per rank
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from rsd import distributed
from rsd.data.dataset import FrameDataset
from rsd.data.source import DataSource, as_source, read_episodes, source_fingerprint
from rsd.device import check_device, resolve_device_dtype
from rsd.errors import CheckpointError, ConfigError
from rsd.io import FORMAT_VERSION, check_out, read_manifest, sha256_file
from rsd.models.main import MainModel
from rsd.tokenizer import ActionTokenizer, tokens_to_layers

INDEX = "index.json"
SHARD_LAYOUT = "episodes"  # shards hold whole episodes (`shard_plan`); recorded so older frame-range folders are refused


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
    device: str = "cpu",
    dtype: str | None = None,
) -> dict[str, Any]:
    """Write (or finish) the features folder `out` for `policy` at `exit_layer` over the frames of `data`.

    Under torchrun every rank computes its share of the shards (`World.shard` of the shard plan) and rank 0
    writes the index once all are done; `device="cuda"` puts each rank on its own GPU.
    """
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"collect-features --{name.replace('_', '-')}: expected an int >= 1, got {value!r}.")
    if Path(out).is_dir() and any(Path(out).iterdir()):
        check_out(out, "features", overwrite=True)  # resumed in place: only a features folder (never a policy, a draft...)
    world = distributed.current()
    torch_device, torch_dtype = resolve_device_dtype(world.device(check_device(device)), dtype)
    main = MainModel.load(policy, device=torch_device, dtype=torch_dtype)
    if not 0 <= exit_layer <= main.num_layers:
        raise ConfigError(f"collect-features --exit-layer: expected an int in 0..{main.num_layers}, got {exit_layer}.")
    out = Path(out)
    source = as_source(data)
    episodes = read_episodes(source)
    dataset = FrameDataset(episodes, main.tokenizer.config.chunk_len)
    plan = shard_plan(dataset.episode_ids, shard_size)
    index = _open_index(out, main, exit_layer, source, len(dataset), shard_size)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_index(out, index)
        main.tokenizer.save(out / "tokenizer")
    world.barrier()
    tok = main.tokenizer.config
    mine = world.shard(range(len(plan)))
    start_time, computed = time.perf_counter(), 0
    rank = f" rank {world.rank}/{world.world_size}" if world.world_size > 1 else ""
    bar = tqdm(total=sum(plan[s][1] - plan[s][0] for s in mine), desc=f"collect-features k={exit_layer}{rank}", unit="frame", disable=not progress)
    for shard in mine:
        lo, hi = plan[shard]
        if _finished(out, shard, lo, hi) is not None:
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
                gt = main.tokenizer.encode(torch.as_tensor(batch.actions, dtype=torch.float32, device=torch_device))
                parts["gt_tokens"].append(tokens_to_layers(gt).to(torch.uint8).cpu())
            parts["episode_id"].append(torch.as_tensor(batch.episode_ids, dtype=torch.int64))
            parts["frame_index"].append(torch.as_tensor(batch.frame_indices, dtype=torch.int64))
            bar.update(len(batch.instructions))
            computed += len(batch.instructions)
            bar.set_postfix(fps=f"{computed / (time.perf_counter() - start_time):.0f}")
        name = _shard_name(shard)
        save_file({k: torch.cat(v) for k, v in parts.items()}, str(out / f"{name}.safetensors"))
        entry = {"file": f"{name}.safetensors", "frames": hi - lo, "first_frame": lo, "sha256": sha256_file(out / f"{name}.safetensors"),
                 "rank": world.rank, "world_size": world.world_size}
        _write_json(out / f"{name}.json", entry)
    bar.close()
    world.barrier()
    if world.is_main:
        index["shards"] = [entry for shard, (lo, hi) in enumerate(plan) if (entry := _finished(out, shard, lo, hi)) is not None]
        index["complete"] = len(index["shards"]) == len(plan)
        index["world_size"] = world.world_size
        _write_index(out, index)
    computed = int(world.sum(torch.tensor([computed]))[0])  # a collective: no rank returns before the index is written
    return {"frames": len(dataset), "shards": len(plan), "computed_frames": computed, "exit_layer": exit_layer, "out": str(out),
            "world_size": world.world_size}


def shard_plan(episode_ids: np.ndarray, shard_size: int) -> list[tuple[int, int]]:
    """Frame ranges `[lo, hi)` of the shards: whole consecutive episodes, up to `shard_size` frames (at least one episode).

    `episode_ids` `[N]` is the episode of every frame, episodes contiguous. The plan depends on the data and
    `shard_size` only, never on the number of ranks, so any world size (and any resumed run) computes the same
    shards with the same batches.
    """
    if shard_size <= 0:
        raise ConfigError(f"collect-features --shard-size: expected a positive int, got {shard_size}.")
    bounds = np.flatnonzero(np.r_[True, episode_ids[1:] != episode_ids[:-1]]).tolist() + [len(episode_ids)]
    plan: list[tuple[int, int]] = []
    lo = 0
    for begin, end in zip(bounds[:-1], bounds[1:], strict=True):  # one episode: frames [begin, end)
        if begin > lo and end - lo > shard_size:
            plan.append((lo, begin))
            lo = begin
    return plan + [(lo, len(episode_ids))]


def _shard_name(shard: int) -> str:
    return f"shard_{shard:05d}"


def _finished(out: Path, shard: int, lo: int, hi: int) -> dict[str, Any] | None:
    """The index entry of shard `shard` if its file and record are complete and match the plan, else None."""
    record = out / f"{_shard_name(shard)}.json"
    if not record.is_file():
        return None
    entry = json.loads(record.read_text())
    file = out / entry["file"]
    if (entry["first_frame"], entry["frames"]) != (lo, hi - lo) or not file.is_file() or sha256_file(file) != entry["sha256"]:
        return None
    return entry


def _open_index(out: Path, main: MainModel, exit_layer: int, source: DataSource, total: int, shard_size: int) -> dict[str, Any]:
    """Read the existing index (refusing another main model, exit layer, dataset or shard layout) or start a new one."""
    identity = {
        "main_fingerprint": main.fingerprint,
        "exit_layer": exit_layer,
        "data_sha256": source_fingerprint(source),
        "frames": total,
        "shard_size": shard_size,
        "shard_layout": SHARD_LAYOUT,
    }
    path = out / INDEX
    if path.is_file():
        index = json.loads(path.read_text())
        for key, value in identity.items():
            if index.get(key) != value:
                raise CheckpointError(
                    f"{path}: this features folder holds {key} = {index.get(key)!r}, but this run has {value!r}. "
                    "Features from different main models, exit layers, datasets or shard layouts cannot be mixed: use another --out."
                )
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


def _write_json(path: Path, content: dict[str, Any]) -> None:
    """Write JSON atomically (a temporary file renamed over `path`)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    tmp.replace(path)


def _write_index(out: Path, index: dict[str, Any]) -> None:
    _write_json(out / INDEX, index)


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
