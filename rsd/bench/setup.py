"""What a benchmark times: a trained policy with its bundle's engines and replayed observations, or random weights.

Two ways to get a main model:
- `bundle_setup`: a trained policy folder and its exported bundle (every engine the bundle holds that runs here),
  with observations replayed from a demonstration file.
- `random_setup`: a preset's exact shapes with random weights (latency does not depend on weight values), a
  random draft and decoder — how the 7B-shaped model is timed on a GPU without the checkpoint.

Usage:
    setup = random_setup("tiny", torch.device("cpu"), torch.float32, exit_layers=[3])
    setup = bundle_setup("runs/demo/bundle", "runs/demo/policy", device, dtype, None, "runs/demo/demos.hdf5", replay=32)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd.data.source import DataSource, read_episodes
from rsd.data.stats import ActionStats, DatasetStatistics
from rsd.errors import ConfigError
from rsd.models.draft import DraftHead
from rsd.models.heads import RFSQHead
from rsd.models.main import MainModel
from rsd.models.processor import VLAInputs
from rsd.models.vla import PrismaticVLA
from rsd.presets import get_preset
from rsd.runtime.bundle import LoadedBundle, available_engines, load_bundle_engines
from rsd.runtime.engines import DecoderEngine, DraftEngine, TorchDecoderEngine, TorchDraftEngine
from rsd.tokenizer import ActionTokenizer

RANDOM_PROMPT_TOKENS = 34  # Llama tokens of a typical LIBERO prompt ("In: What action should the robot take to ...?\nOut:")


@dataclass
class BenchSetup:
    """What one benchmark run times: the main model, inputs, and the draft/decoder engines by name."""

    main: MainModel
    inputs: VLAInputs
    drafts: dict[str, DraftEngine]  # engine name -> draft engine (the bundle's exit layer or any)
    decoders: dict[str, dict[int, DecoderEngine]]  # engine name -> {c: decoder engine}
    exit_layers: list[int]
    source: str
    bundle: LoadedBundle | None = None  # the bundle's engines and gate settings when benchmarking a bundle
    observations: list[dict[str, Any]] = field(default_factory=list)


def random_setup(preset: str, device: torch.device, dtype: torch.dtype, exit_layers: list[int], seed: int = 0) -> BenchSetup:
    """A main model, draft and decoder with random weights in the preset's exact shapes (latency only)."""
    spec = get_preset(preset)
    torch.manual_seed(seed)
    vla = PrismaticVLA.random(spec.model, device=device, dtype=dtype, seed=seed)
    tok = spec.model.tokenizer
    head = RFSQHead(spec.model.llm.hidden_size, tok).to(device, dtype)
    bounds = np.stack([-np.ones(tok.action_dim), np.ones(tok.action_dim)])
    stats = DatasetStatistics(action=ActionStats.from_actions(bounds), proprio=ActionStats.from_actions(np.stack([-np.ones(max(spec.model.proprio_dim, 1)), np.ones(max(spec.model.proprio_dim, 1))])) if spec.model.proprio_dim else None)
    tokenizer = ActionTokenizer(tok, stats.action).to(device)
    main = MainModel(vla, head, tokenizer, stats, "random", fingerprint=f"random-weights:{preset}:seed{seed}").eval()
    draft = DraftHead(spec.draft(exit_layers[0])).to(device, dtype).eval()
    decoders = {c: TorchDecoderEngine(tokenizer.decoder_module(), c) for c in (tok.coarse_layers, tok.num_layers)}
    return BenchSetup(
        main=main,
        inputs=vla.random_inputs(batch=1, prompt_len=RANDOM_PROMPT_TOKENS, seed=seed),
        drafts={"torch": TorchDraftEngine(draft)},
        decoders={"torch": decoders},
        exit_layers=exit_layers,
        source=f"{preset} with random weights (latency only)",
    )


def example_inputs(main: MainModel, device: torch.device, instruction: str = "pick up the black bowl and place it on the plate") -> VLAInputs:
    """One observation's model inputs with a random image (and zero proprio) of the model's size."""
    config = main.vla.config
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(1, config.num_images, config.image_size, config.image_size, 3), dtype=np.uint8)
    proprio = np.zeros((1, config.proprio_dim), dtype=np.float32) if config.proprio_dim else None
    return main.prepare(images, [instruction], proprio).to(device)


def bundle_setup(bundle: str | Path, main_dir: str | Path, device: torch.device, dtype: torch.dtype, exit_layers: list[int] | None,
                 observations: str | Path | DataSource | None, replay: int) -> BenchSetup:
    """A trained policy with every engine its bundle holds, and observations replayed from a demo file."""
    main = MainModel.load(main_dir, device=device, dtype=dtype)
    drafts: dict[str, DraftEngine] = {}
    decoders: dict[str, dict[int, DecoderEngine]] = {}
    loaded = None
    for name in available_engines(bundle, device):
        loaded = load_bundle_engines(bundle, main, engine=name, device=device)
        drafts[name], decoders[name] = loaded.draft, loaded.decoders
    if loaded is None:
        raise ConfigError(f"bench-latency: the bundle {bundle} has no engine that runs on {device}.")
    layers = sorted(set(exit_layers or []) | {loaded.exit_layer})
    obs = replay_observations(observations, replay) if observations else []
    return BenchSetup(main, example_inputs(main, device), drafts, decoders, layers, f"bundle {bundle} + policy {main_dir}", loaded, obs)


def replay_observations(path: str | Path | DataSource, count: int) -> list[dict[str, Any]]:
    """Up to `count` observation dicts taken evenly from the frames of a demo file or LeRobot folder, read as a DataSource says."""
    frames = []
    for episode in read_episodes(path):
        camera = sorted(episode.images)
        for t in range(len(episode.actions)):
            images = [episode.images[c][t] for c in camera]
            frames.append({
                "image": images[0] if len(images) == 1 else images,
                "instruction": episode.instruction,
                "proprio": None if episode.proprio is None else episode.proprio[t],
            })
    if not frames:
        raise ConfigError(f"bench-latency --observations: {path} holds no frames.")
    step = max(1, len(frames) // count)
    return frames[::step][:count]
