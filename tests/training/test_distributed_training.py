"""Feature collection and DDP/FSDP training on 2 local gloo ranks equal the single-process runs; only rank 0 writes.

Each test starts its ranks with `rsd.distributed.run_local` (torch's elastic launcher, forked: a second to start)
and compares what they wrote with a single-process run in this process: features bit for bit, weights after one
epoch with the same global batch within 1e-5.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rsd import distributed
from rsd.config import PolicyTrainConfig, TrainConfig
from rsd.data.hdf5 import read_demos
from rsd.presets import get_preset
from rsd.training.draft import train_draft
from rsd.training.features import collect_features, load_features, shard_plan
from rsd.training.policy import train_policy
from rsd.training.tokenizer import train_tokenizer

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

FEATURE_KEYS = ("exit_hidden", "main_logits", "main_tokens", "gt_tokens", "episode_id", "frame_index")
TRAIN = TrainConfig(epochs=1, batch_size=32, lr=1e-3, val_fraction=0.34)
POLICY_OPTIONS = PolicyTrainConfig(rollout_episodes=3, rollout_seed=500)  # 3 seeds: 2 on rank 0, 1 on rank 1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Six demos, a saved tiny main model (random weights), a 1-epoch tokenizer and single-process features."""
    from conftest import make_tiny_main

    from rsd.envs.demos import generate_demos

    root = tmp_path_factory.mktemp("distributed")
    make_tiny_main(seed=3).save(root / "policy")
    generate_demos("tabletop", episodes=6, out=root / "demos.hdf5", seed=0, progress=False)
    _tokenizer(root / "tokenizer", root)
    collect_features(root / "policy", root / "demos.hdf5", 3, root / "features", shard_size=64, progress=False)
    return root


def _tokenizer(out: Path, root: Path) -> dict:
    spec = get_preset("tiny")
    episodes = read_demos(root / "demos.hdf5")
    return train_tokenizer([e.actions for e in episodes], spec.tokenizer, dataclasses.replace(spec.tokenizer_train, epochs=1), out,
                           [e.episode_id for e in episodes], progress=False)


def _on_ranks(function, *args):
    """`function(*args)` on 2 local ranks inside a session."""
    return distributed.run_local(2, _in_session, function, args)


def _in_session(function, args):
    with distributed.session() as world:
        return function(world, *args)


def _max_difference(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def _collect(world, root: Path, out: Path) -> dict:
    return collect_features(root / "policy", root / "demos.hdf5", 3, out, shard_size=64, progress=False)


def test_shard_plan_keeps_episodes_whole() -> None:
    episode_ids = np.repeat([4, 7, 9, 11], [30, 50, 20, 90])
    assert shard_plan(episode_ids, 80) == [(0, 80), (80, 100), (100, 190)]  # an episode longer than a shard stays whole
    assert shard_plan(episode_ids, 1000) == [(0, 190)]
    assert shard_plan(episode_ids, 1) == [(0, 30), (30, 80), (80, 100), (100, 190)]


def test_features_from_two_ranks_equal_the_single_process_features(run) -> None:
    out = run / "features_2"
    summaries = _on_ranks(_collect, run, out)
    single, double = load_features(run / "features"), load_features(out)
    for key in FEATURE_KEYS:
        assert torch.equal(getattr(single, key), getattr(double, key)), key
    index = json.loads((out / "index.json").read_text())
    assert index["world_size"] == 2 and index["complete"]
    assert [e["rank"] for e in index["shards"]] == [i % 2 for i in range(len(index["shards"]))]
    assert [e["sha256"] for e in index["shards"]] == [e["sha256"] for e in single.index["shards"]]
    assert all(s["computed_frames"] == s["frames"] == len(single.episode_id) for s in summaries)
    episodes = [set(load_file(str(out / e["file"]))["episode_id"].tolist()) for e in index["shards"]]
    assert sum(map(len, episodes)) == len(set().union(*episodes)) == 6  # every episode lies in one shard

    resumed = index["shards"][1]  # written by rank 1
    (out / resumed["file"]).unlink()
    again = _on_ranks(_collect, run, out)
    assert [s["computed_frames"] for s in again] == [resumed["frames"]] * 2
    assert torch.equal(load_features(out).exit_hidden, single.exit_hidden)


def _train_tokenizer(world, root: Path, out: Path) -> dict:
    return _tokenizer(out if world.is_main else Path(f"{out}_rank1"), root)


def test_ddp_tokenizer_epoch_equals_the_single_process_epoch(run) -> None:
    reports = _on_ranks(_train_tokenizer, run, run / "tokenizer_2")
    assert _max_difference(run / "tokenizer" / "tokenizer.safetensors", run / "tokenizer_2" / "tokenizer.safetensors") < 1e-5
    assert not Path(f"{run / 'tokenizer_2'}_rank1").exists()
    single = json.loads((run / "tokenizer" / "report.json").read_text())
    assert reports[0]["history"][0]["train_loss"] == pytest.approx(single["history"][0]["train_loss"], rel=1e-5)


def _train_draft(world, root: Path, out: Path) -> dict:
    return train_draft(root / "features", out if world.is_main else Path(f"{out}_rank1"), "tiny", TRAIN, progress=False)


def test_ddp_draft_epoch_equals_the_single_process_epoch(run) -> None:
    single = train_draft(run / "features", run / "draft", "tiny", TRAIN, progress=False)
    summaries = _on_ranks(_train_draft, run, run / "draft_2")
    assert _max_difference(run / "draft" / "draft.safetensors", run / "draft_2" / "draft.safetensors") < 1e-5
    assert not Path(f"{run / 'draft_2'}_rank1").exists() and (run / "draft_2" / "metrics.json").is_file()
    for summary in summaries:
        assert summary["history"][0]["train_loss"] == pytest.approx(single["history"][0]["train_loss"], rel=1e-5)
        assert summary["history"][0]["val_agreement"] == pytest.approx(single["history"][0]["val_agreement"], abs=1e-3)


@pytest.fixture(scope="module")
def single_policy(run):
    """One epoch of the tiny policy in this process (with rollout selection on 3 seeds)."""
    return train_policy(run / "demos.hdf5", run / "tokenizer", run / "policy_1", train=TRAIN, options=POLICY_OPTIONS, progress=False)


def _train_policy(world, root: Path, out: Path, parallel: str) -> dict:
    return train_policy(root / "demos.hdf5", root / "tokenizer", out if world.is_main else Path(f"{out}_rank1"), train=TRAIN,
                        options=POLICY_OPTIONS, progress=False, parallel=parallel)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_data_parallel_policy_epoch_equals_the_single_process_epoch(run, single_policy, parallel: str) -> None:
    out = run / f"policy_{parallel}"
    summaries = _on_ranks(_train_policy, run, out, parallel)
    for part in ("vla/model.safetensors", "head.safetensors"):
        assert _max_difference(run / "policy_1" / part, out / part) < 1e-5, part
    assert not Path(f"{out}_rank1").exists() and (out / "metrics.json").is_file()
    expected = single_policy["history"][0]
    for summary in summaries:
        got = summary["history"][0]
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
        assert got["val_action_l1"] == pytest.approx(expected["val_action_l1"], rel=1e-4)
        assert got["rollout_success"] == expected["rollout_success"]
        assert summary["fingerprint"] == summaries[0]["fingerprint"] != "unsaved"
