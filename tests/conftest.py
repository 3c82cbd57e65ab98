"""Shared fixtures, one torch thread for the run, and the skips for GPU, TensorRT and simulator tests."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Run torch on one thread: the tiny models gain little from a second one, and on a loaded machine the waiting
    thread-pool workers made small ops many times slower (the synthetic-set tokenizer test: 10+ minutes, not 1)."""
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests without CUDA and `tensorrt` tests without torch-tensorrt, saying why."""
    has_cuda = torch.cuda.is_available()
    has_trt = has_cuda and importlib.util.find_spec("torch_tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is false on this machine"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs CUDA and torch-tensorrt (pip install .[gpu]); not present here"))


def tiny_model_at_width(hidden_size: int):
    """The `tiny` preset's VLAConfig with its LLM at `hidden_size` (intermediate size scaled as the preset's, 344 at 128)."""
    from rsd.presets import get_preset

    model = get_preset("tiny").model
    return dataclasses.replace(model, llm=dataclasses.replace(model.llm, hidden_size=hidden_size, intermediate_size=hidden_size * 344 // 128))


def make_tiny_main(seed: int = 0, hidden_size: int | None = None):
    """A tiny MainModel with seeded random weights (real components; for runtime logic, not for accuracy); `hidden_size`
    overrides the preset's LLM width (intermediate size scaled with it)."""
    import numpy as np

    from rsd.data.stats import ActionStats, DatasetStatistics
    from rsd.models.heads import RFSQHead
    from rsd.models.main import MainModel
    from rsd.models.vla import PrismaticVLA
    from rsd.presets import get_preset
    from rsd.tokenizer import ActionTokenizer

    torch.manual_seed(seed)
    spec = get_preset("tiny")
    if hidden_size is not None:
        spec = dataclasses.replace(spec, model=tiny_model_at_width(hidden_size))
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1.0, 1.0, size=(256, spec.tokenizer.action_dim))
    proprio = rng.uniform(-0.5, 0.5, size=(256, spec.model.proprio_dim))
    stats = DatasetStatistics(action=ActionStats.from_actions(actions), proprio=ActionStats.from_actions(proprio))
    tokenizer = ActionTokenizer(spec.tokenizer, stats.action)
    main = MainModel(PrismaticVLA(spec.model), RFSQHead(spec.model.llm.hidden_size, spec.tokenizer), tokenizer, stats, "test")
    return main.eval()


def save_tiny_draft_sources(root, fingerprint: str) -> dict:
    """Save a random tiny draft (meta as `rsd train-draft` writes it) and a tiny tokenizer under `root`; their folders."""
    import numpy as np

    from rsd.data.stats import ActionStats
    from rsd.models.draft import DraftHead
    from rsd.presets import get_preset
    from rsd.tokenizer import ActionTokenizer

    torch.manual_seed(0)
    spec = get_preset("tiny")
    DraftHead(spec.draft()).save(root / "draft", {"main_fingerprint": fingerprint, "val_episodes": []})
    stats = ActionStats.from_actions(np.random.default_rng(0).uniform(-1, 1, (256, spec.tokenizer.action_dim)))
    ActionTokenizer(spec.tokenizer, stats).save(root / "tokenizer")
    return {"draft": root / "draft", "tokenizer": root / "tokenizer", "root": root}


def make_observation(seed: int = 0, instruction: str = "pick up the red block and place it on the plate") -> dict:
    """A valid tiny-preset observation with a random image and proprio."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8),
        "instruction": instruction,
        "proprio": rng.uniform(-0.5, 0.5, size=8).astype(np.float32),
    }


@pytest.fixture()
def tiny_main():
    """A fresh tiny MainModel with seeded random weights."""
    return make_tiny_main()


SEGMENTS_EXIT, SEGMENTS_PROMPT = 3, 24  # the exit layer and padded prompt of the session's packaged segments


@pytest.fixture(scope="session")
def tiny_segments(tmp_path_factory: pytest.TempPathFactory):
    """`make_tiny_main()`'s segments at exit layer 3, prompt 24, exported once per run as AOTInductor packages (compiling
    five graphs is about a minute and a half on two cores): the export tests read it, the compiled runtime runs it."""
    from rsd.export.segments import export_main_segments

    out = tmp_path_factory.mktemp("segments") / "k3"
    export_main_segments(make_tiny_main(), SEGMENTS_EXIT, out, prompt_tokens=SEGMENTS_PROMPT)
    return out


def two_vit_config(cogvla=None):
    """The tiny-vit model with a second, narrower ViT (16 patches each), as OpenVLA fuses DINOv2 and SigLIP; `cogvla` set if given."""
    import dataclasses

    from rsd.config import CogVLAConfig
    from rsd.presets import get_preset

    model = get_preset("tiny-vit").model
    vit = model.vision[0]
    return dataclasses.replace(model, vision=(vit, dataclasses.replace(vit, embed_dim=64, num_heads=2)), cogvla=cogvla or CogVLAConfig())
