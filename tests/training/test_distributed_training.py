"""Feature collection and DDP/FSDP training (FSDP also with compiled decoder layers) on 2 local gloo ranks equal the
single-process runs; only rank 0 writes.

One pair of ranks, spawned once for the module by `rsd.distributed.run_local` (torch's elastic launcher), runs
every distributed step in turn (`_on_two_ranks`); the tests compare what they wrote with single-process runs in
this process: features bit for bit, weights after one epoch with the same global batch within `WEIGHT_TOLERANCE`
(a tenth of one AdamW step at lr 1e-3: Adam divides by the gradient's running scale, so the rounding differences
of a split batch grow on near-zero gradients, by how much depends on the CPU's kernels: the policy's weights
differed by under 1e-5 on one machine and by 3.5e-5 on an AMD EPYC). Each rank but 0 gets its own output folder, which must stay unwritten.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rsd import distributed
from rsd.config import PolicyTrainConfig, TrainConfig
from rsd.data.hdf5 import read_demos
from rsd.device import cpu_compiler
from rsd.presets import get_preset
from rsd.training.draft import train_draft
from rsd.training.features import collect_features, load_features, shard_plan
from rsd.training.policy import train_policy
from rsd.training.tokenizer import train_tokenizer

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

FEATURE_KEYS = ("exit_hidden", "main_logits", "main_tokens", "gt_tokens", "episode_id", "frame_index")
TRAIN = TrainConfig(epochs=1, batch_size=32, lr=1e-3, val_fraction=0.34)
WEIGHT_TOLERANCE = 1e-4
POLICY_OPTIONS = PolicyTrainConfig(rollout_episodes=3, rollout_seed=500, object_loss=1.0, rollout_batch=2)  # 3 seeds: 2 on rank 0 (side by side), 1 on rank 1; the object head too
AVERAGED = PolicyTrainConfig(select_by="val_l1", ema_decay=0.9)  # the weights' moving average, sharded with them under FSDP
SMALL_BATCHES = dataclasses.replace(TRAIN, batch_size=8)  # enough steps for the average to lag the weights


def _tokenizer(root: Path, out: Path) -> dict:
    spec = get_preset("tiny")
    episodes = read_demos(root / "demos.hdf5")
    return train_tokenizer([e.actions for e in episodes], spec.tokenizer, dataclasses.replace(spec.tokenizer_train, epochs=1), out,
                           [e.episode_id for e in episodes], progress=False)


def _collect(root: Path, out: Path) -> dict:
    return collect_features(root / "policy", root / "demos.hdf5", 3, out, shard_size=64, progress=False)


def _policy(root: Path, out: Path, parallel: str = "ddp", options: PolicyTrainConfig = POLICY_OPTIONS, train: TrainConfig = TRAIN) -> dict:
    return train_policy(root / "demos.hdf5", root / "tokenizer", out, train=train, options=options, progress=False, parallel=parallel)


def _on_two_ranks(root: Path) -> dict[str, Any]:
    """Every distributed step, run by each of the two ranks; what the steps returned on this rank."""
    torch.set_num_threads(1)
    with distributed.session() as world:
        def own(name: str) -> Path:  # rank 0 writes to root/name, the others to a folder that must stay empty
            return root / name if world.is_main else root / f"{name}_rank{world.rank}"

        results: dict[str, Any] = {"world": world, "features": _collect(root, root / "features_2")}
        index = json.loads((root / "features_2" / "index.json").read_text())
        results["removed"] = index["shards"][1]  # written by rank 1: the resumed run must recompute it alone
        world.barrier()
        if world.is_main:
            (root / "features_2" / results["removed"]["file"]).unlink()
        world.barrier()
        results["resumed"] = _collect(root, root / "features_2")
        results["tokenizer"] = _tokenizer(root, own("tokenizer_2"))
        results["draft"] = train_draft(root / "features", own("draft_2"), "tiny", TRAIN, progress=False)
        results["ddp"] = _policy(root, own("policy_ddp"), "ddp")
        results["fsdp"] = _policy(root, own("policy_fsdp"), "fsdp")
        results["fsdp_averaged"] = _policy(root, own("policy_fsdp_averaged"), "fsdp", AVERAGED, SMALL_BATCHES)
        if cpu_compiler() is not None:  # each rank compiles its decoder layers for its 16 rows of the global batch
            results["fsdp_compiled"] = _policy(root, own("policy_fsdp_compiled"), "fsdp", dataclasses.replace(POLICY_OPTIONS, compile=True))
    return results


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Six demos, a saved tiny main model (random weights), a 1-epoch tokenizer, single-process features, and then
    every distributed step on two spawned ranks (their results in rank order)."""
    from conftest import make_tiny_main

    from rsd.envs.demos import generate_demos

    root = tmp_path_factory.mktemp("distributed")
    make_tiny_main(seed=3).save(root / "policy")
    generate_demos("tabletop", episodes=6, out=root / "demos.hdf5", seed=0, progress=False)
    _tokenizer(root, root / "tokenizer")
    collect_features(root / "policy", root / "demos.hdf5", 3, root / "features", shard_size=64, progress=False)
    return root, distributed.run_local(2, _on_two_ranks, root)


def _max_difference(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def _only_rank_0_wrote(root: Path, name: str) -> bool:
    return (root / name).is_dir() and not (root / f"{name}_rank1").exists()


def test_shard_plan_keeps_episodes_whole() -> None:
    episode_ids = np.repeat([4, 7, 9, 11], [30, 50, 20, 90])
    assert shard_plan(episode_ids, 80) == [(0, 80), (80, 100), (100, 190)]  # an episode longer than a shard stays whole
    assert shard_plan(episode_ids, 1000) == [(0, 190)]
    assert shard_plan(episode_ids, 1) == [(0, 30), (30, 80), (80, 100), (100, 190)]


def test_ranks_are_rank_0_and_1_of_2(run) -> None:
    _, ranks = run
    assert [r["world"] for r in ranks] == [distributed.World(0, 2, 0), distributed.World(1, 2, 1)]


def test_features_from_two_ranks_equal_the_single_process_features(run) -> None:
    root, ranks = run
    single, double = load_features(root / "features"), load_features(root / "features_2")
    for key in FEATURE_KEYS:
        assert torch.equal(getattr(single, key), getattr(double, key)), key
    index = json.loads((root / "features_2" / "index.json").read_text())
    assert index["world_size"] == 2 and index["complete"]
    assert [e["rank"] for e in index["shards"]] == [i % 2 for i in range(len(index["shards"]))]
    assert [e["sha256"] for e in index["shards"]] == [e["sha256"] for e in single.index["shards"]]
    assert all(r["features"]["computed_frames"] == r["features"]["frames"] == len(single.episode_id) for r in ranks)
    episodes = [set(load_file(str(root / "features_2" / e["file"]))["episode_id"].tolist()) for e in index["shards"]]
    assert sum(map(len, episodes)) == len(set().union(*episodes)) == 6  # every episode lies in one shard


def test_a_resumed_run_on_two_ranks_recomputes_only_the_missing_shard(run) -> None:
    _, ranks = run
    assert [r["resumed"]["computed_frames"] for r in ranks] == [ranks[0]["removed"]["frames"]] * 2


def test_ddp_tokenizer_epoch_equals_the_single_process_epoch(run) -> None:
    root, ranks = run
    assert _max_difference(root / "tokenizer" / "tokenizer.safetensors", root / "tokenizer_2" / "tokenizer.safetensors") < WEIGHT_TOLERANCE
    assert _only_rank_0_wrote(root, "tokenizer_2")
    single = json.loads((root / "tokenizer" / "report.json").read_text())
    for r in ranks:
        assert r["tokenizer"]["history"][0]["train_loss"] == pytest.approx(single["history"][0]["train_loss"], rel=1e-5)


def test_ddp_draft_epoch_equals_the_single_process_epoch(run) -> None:
    root, ranks = run
    single = train_draft(root / "features", root / "draft", "tiny", TRAIN, progress=False)
    assert _max_difference(root / "draft" / "draft.safetensors", root / "draft_2" / "draft.safetensors") < WEIGHT_TOLERANCE
    assert _only_rank_0_wrote(root, "draft_2") and (root / "draft_2" / "metrics.json").is_file()
    for r in ranks:
        assert r["draft"]["history"][0]["train_loss"] == pytest.approx(single["history"][0]["train_loss"], rel=1e-5)
        assert r["draft"]["history"][0]["val_agreement"] == pytest.approx(single["history"][0]["val_agreement"], abs=1e-3)


@pytest.fixture(scope="module")
def single_policy(run):
    """One epoch of the tiny policy in this process (with rollout selection on 3 seeds)."""
    root, _ = run
    return _policy(root, root / "policy_1")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_data_parallel_policy_epoch_equals_the_single_process_epoch(run, single_policy, parallel: str) -> None:
    root, ranks = run
    for part in ("vla/model.safetensors", "head.safetensors"):
        assert _max_difference(root / "policy_1" / part, root / f"policy_{parallel}" / part) < WEIGHT_TOLERANCE, part
    assert _only_rank_0_wrote(root, f"policy_{parallel}") and (root / f"policy_{parallel}" / "metrics.json").is_file()
    expected = single_policy["history"][0]
    for r in ranks:
        got = r[parallel]["history"][0]
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
        assert got["val_action_l1"] == pytest.approx(expected["val_action_l1"], rel=1e-4)
        assert got["train_object_mse"] == pytest.approx(expected["train_object_mse"], rel=1e-5)
        assert got["val_object_mse"] == pytest.approx(expected["val_object_mse"], rel=1e-4)
        assert got["rollout_success"] == expected["rollout_success"]
        assert r[parallel]["fingerprint"] == ranks[0][parallel]["fingerprint"] != "unsaved"


def test_the_weights_average_under_fsdp_equals_the_single_process_average(run) -> None:
    """The average lives in the parameters' shards; copied in before they are gathered, it is what rank 0 saves."""
    root, ranks = run
    averaged = _policy(root, root / "policy_averaged", options=AVERAGED, train=SMALL_BATCHES)
    _policy(root, root / "policy_live", options=dataclasses.replace(AVERAGED, ema_decay=0.0), train=SMALL_BATCHES)
    for part in ("vla/model.safetensors", "head.safetensors"):
        sharded = _max_difference(root / "policy_averaged" / part, root / "policy_fsdp_averaged" / part)
        assert sharded < WEIGHT_TOLERANCE, part
        assert sharded < 0.1 * _max_difference(root / "policy_averaged" / part, root / "policy_live" / part), part
    assert _only_rank_0_wrote(root, "policy_fsdp_averaged")
    assert [r["fsdp_averaged"]["history"][0]["train_loss"] for r in ranks] == pytest.approx([averaged["history"][0]["train_loss"]] * 2, rel=1e-5)


@pytest.mark.skipif(cpu_compiler() is None, reason="torch.compile on a CPU needs a C++ compiler ($CXX or g++) and Python.h")
def test_compiled_layers_under_fsdp_train_the_single_process_eager_epoch(run, single_policy) -> None:
    """`--compile` with FSDP: each rank's compiled decoder layers run on its shard of the batch; the epoch is the eager one."""
    root, ranks = run
    for part in ("vla/model.safetensors", "head.safetensors"):
        assert _max_difference(root / "policy_1" / part, root / "policy_fsdp_compiled" / part) < WEIGHT_TOLERANCE, part
    assert _only_rank_0_wrote(root, "policy_fsdp_compiled")
    expected = single_policy["history"][0]
    for r in ranks:
        got = r["fsdp_compiled"]["history"][0]
        assert r["fsdp_compiled"]["options"]["compile"] is True
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-4)
        assert got["val_action_l1"] == pytest.approx(expected["val_action_l1"], rel=1e-4)
        assert got["rollout_success"] == expected["rollout_success"]
