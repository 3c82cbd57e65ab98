"""train-policy: closed-loop checkpoint selection and the per-dimension validation errors it reports."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch

from rsd.config import PolicyTrainConfig
from rsd.data.hdf5 import read_demos, write_demos
from rsd.device import cpu_compiler
from rsd.envs.demos import generate_demos
from rsd.errors import ConfigError, ShapeError
from rsd.presets import get_preset
from rsd.runtime.policy import MainOnlyPolicy, load_main
from rsd.training.policy import significantly_better, train_policy
from rsd.training.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """Six tabletop demonstrations and a tokenizer trained on them for two epochs."""
    root = tmp_path_factory.mktemp("policy")
    generate_demos("tabletop", episodes=6, out=root / "demos.hdf5", progress=False)
    spec = get_preset("tiny")
    episodes = read_demos(root / "demos.hdf5")
    train_tokenizer([e.actions for e in episodes], spec.tokenizer, dataclasses.replace(spec.tokenizer_train, epochs=2), root / "tokenizer",
                    [e.episode_id for e in episodes], progress=False)
    return root


def test_rollout_selection_records_each_seed_and_keeps_the_last_epoch_two_episodes_cannot_beat(demos, tmp_path):
    train = dataclasses.replace(get_preset("tiny").policy_train, epochs=3, batch_size=64, val_fraction=0.34)
    options = PolicyTrainConfig(rollout_every=2, rollout_episodes=2, rollout_seed=500)
    summary = train_policy(demos / "demos.hdf5", demos / "tokenizer", tmp_path / "policy", train=train, options=options, progress=False)
    evaluated = [m for m in summary["history"] if "rollout_success" in m]
    assert [m["epoch"] for m in evaluated] == [2, 3]  # every 2nd epoch, and always the last
    assert all(len(m["rollout_outcomes"]) == 2 and np.mean(m["rollout_outcomes"]) == m["rollout_success"] for m in evaluated)
    assert summary["best"]["epoch"] == 3  # on two seeds no difference is significant at 5 %: the later epoch wins
    assert summary["rollout_env"] == {"env": "tabletop", "env_kwargs": {"image_size": 64}}
    assert len(summary["best"]["val_action_l1_per_dim"]) == 7 and len(summary["best"]["train_action_l1_per_dim"]) == 7


def test_rollout_selection_keeps_an_earlier_epoch_only_when_it_is_significantly_better(demos, tmp_path, monkeypatch):
    """Scripted outcomes on 20 seeds: epoch 2 (all fail) loses to epoch 1 (all succeed); epoch 3 (18/20) is within noise of
    epoch 1 and replaces it; epoch 4 (8/20, failing ten seeds epoch 3 won) does not."""
    scripted = iter([np.ones(20), np.zeros(20), np.r_[np.ones(18), np.zeros(2)], np.r_[np.ones(8), np.zeros(12)]])
    monkeypatch.setattr("rsd.training.policy.rollout_outcomes", lambda main, env, options: next(scripted))
    train = dataclasses.replace(get_preset("tiny").policy_train, epochs=4, batch_size=64, val_fraction=0.34)
    summary = train_policy(demos / "demos.hdf5", demos / "tokenizer", tmp_path / "policy", train=train,
                           options=PolicyTrainConfig(rollout_episodes=20), progress=False)
    assert [m["rollout_success"] for m in summary["history"]] == [1.0, 0.0, 0.9, 0.4]
    assert summary["best"]["epoch"] == 3


@pytest.mark.parametrize(("only_kept", "only_later", "alpha", "expected"), [
    (5, 0, 0.05, True),  # p = 1/32
    (4, 0, 0.05, False),  # p = 1/16
    (9, 2, 0.05, True),  # p = 0.033
    (8, 2, 0.05, False),  # p = 0.055
    (6, 0, 0.0, False),  # alpha 0: never; the later epoch always replaces the kept one
    (0, 5, 0.05, False),
    (0, 0, 0.05, False),
])
def test_significantly_better_is_a_one_sided_sign_test(only_kept, only_later, alpha, expected):
    both = 7  # seeds both succeed on, and seeds both fail on: they do not count
    kept = np.r_[np.ones(only_kept + both), np.zeros(only_later + both)]
    later = np.r_[np.zeros(only_kept), np.ones(both), np.ones(only_later), np.zeros(both)]
    assert significantly_better(kept, later, alpha) is expected
    with pytest.raises(ConfigError, match="select_alpha"):
        PolicyTrainConfig(select_alpha=0.5)  # a p-value of 0.5 is no evidence
    with pytest.raises(ConfigError, match="rollout_batch"):
        PolicyTrainConfig(rollout_batch=0)
    with pytest.raises(ShapeError, match="same seeds"):
        significantly_better(kept, later[:-1], alpha)


def test_rollout_selection_needs_an_environment(demos, tmp_path):
    foreign, converted = tmp_path / "foreign.hdf5", tmp_path / "converted.hdf5"
    with h5py.File(demos / "demos.hdf5", "r") as source, h5py.File(foreign, "w") as target:
        source.copy("data", target)
        del target["data"].attrs["env_args"]
    write_demos(converted, read_demos(demos / "demos.hdf5"), env_name="demos_lerobot")  # as `rsd convert --to hdf5` names it
    train = dataclasses.replace(get_preset("tiny").policy_train, epochs=1, batch_size=64, val_fraction=0.34)
    for data in (foreign, converted):  # no env recorded; an env name rsd does not build
        with pytest.raises(ConfigError, match="--rollout-env"):
            train_policy(data, demos / "tokenizer", tmp_path / "p1", train=train, progress=False)
    summary = train_policy(foreign, demos / "tokenizer", tmp_path / "p2", train=train, options=PolicyTrainConfig(select_by="val_l1"), progress=False)
    assert summary["best"]["epoch"] == 1 and "rollout_success" not in summary["best"]


def test_a_rollout_horizon_longer_than_the_chunk_is_refused_before_training(demos, tmp_path):
    train = dataclasses.replace(get_preset("tiny").policy_train, epochs=1, batch_size=64, val_fraction=0.34)
    with pytest.raises(ConfigError, match="chunk length 8, got 9"):
        train_policy(demos / "demos.hdf5", demos / "tokenizer", tmp_path / "p", train=train, options=PolicyTrainConfig(rollout_replan_every=9),
                     progress=False)
    assert not (tmp_path / "p").exists()


def test_the_model_reads_as_many_cameras_as_the_demonstrations_hold(demos, tmp_path):
    """A preset built for one camera trains on agentview + wrist frames with a two-image model (no error, no drop)."""
    episodes = read_demos(demos / "demos.hdf5")
    two = [dataclasses.replace(e, images={"agentview": e.images["agentview"], "robot0_eye_in_hand": e.images["agentview"][:, ::-1].copy()})
           for e in episodes]
    write_demos(tmp_path / "two.hdf5", two, env_name="tabletop", env_kwargs={"image_size": 64})
    train = dataclasses.replace(get_preset("tiny").policy_train, epochs=1, batch_size=64, val_fraction=0.34)
    train_policy(tmp_path / "two.hdf5", demos / "tokenizer", tmp_path / "policy", train=train, options=PolicyTrainConfig(select_by="val_l1"),
                 progress=False)
    main = load_main(tmp_path / "policy", "cpu", None)
    assert main.vla.config.num_images == 2
    obs = {"image": [episodes[0].images["agentview"][0]] * 2, "instruction": episodes[0].instruction, "proprio": episodes[0].proprio[0]}
    assert MainOnlyPolicy(main).predict_chunk(obs).actions.shape == (8, 7)


def test_init_goes_on_from_a_policys_weights_and_statistics(demos, tmp_path):
    """`init` starts from the saved weights (at a vanishing learning rate the validation error is the init's) and
    keeps its statistics; a different tokenizer is refused."""
    train = dataclasses.replace(get_preset("tiny").policy_train, epochs=1, batch_size=64, val_fraction=0.34)
    options = PolicyTrainConfig(select_by="val_l1")
    first = train_policy(demos / "demos.hdf5", demos / "tokenizer", tmp_path / "first", train=train, options=options, progress=False)
    still = dataclasses.replace(train, lr=1e-12)
    again = train_policy(demos / "demos.hdf5", demos / "tokenizer", tmp_path / "again", train=still, options=options, progress=False,
                         init=tmp_path / "first")
    assert again["best"]["val_action_l1"] == pytest.approx(first["best"]["val_action_l1"], abs=1e-6)
    train_policy(demos / "demos.hdf5", demos / "tokenizer", tmp_path / "fresh", train=still, options=options, progress=False)
    weights = {name: load_main(tmp_path / name, "cpu", None).state_dict() for name in ("first", "again", "fresh")}
    assert all(torch.allclose(weights["again"][k], v, atol=1e-6) for k, v in weights["first"].items())
    assert not all(torch.allclose(weights["fresh"][k], v, atol=1e-6) for k, v in weights["first"].items())
    assert (tmp_path / "again" / "dataset_statistics.json").read_text() == (tmp_path / "first" / "dataset_statistics.json").read_text()
    episodes = read_demos(demos / "demos.hdf5")
    spec = get_preset("tiny")
    train_tokenizer([e.actions for e in episodes], spec.tokenizer, dataclasses.replace(spec.tokenizer_train, epochs=1, seed=5),
                    tmp_path / "other_tokenizer", [e.episode_id for e in episodes], progress=False)
    with pytest.raises(ConfigError, match="tokenizer differs"):
        train_policy(demos / "demos.hdf5", tmp_path / "other_tokenizer", tmp_path / "refused", train=train, options=options, progress=False,
                     init=tmp_path / "first")


def test_the_weights_moving_average_is_saved_and_training_never_sees_it(demos, tmp_path):
    train = dataclasses.replace(get_preset("tiny").policy_train, epochs=2, batch_size=16, val_fraction=0.34)
    plain = train_policy(demos / "demos.hdf5", demos / "tokenizer", tmp_path / "plain", train=train, options=PolicyTrainConfig(select_by="val_l1"),
                         progress=False)
    averaged = train_policy(demos / "demos.hdf5", demos / "tokenizer", tmp_path / "averaged", train=train,
                            options=PolicyTrainConfig(select_by="val_l1", ema_decay=0.9), progress=False)
    assert [m["train_loss"] for m in averaged["history"]] == pytest.approx([m["train_loss"] for m in plain["history"]], rel=1e-6)
    assert [m["val_action_l1"] for m in averaged["history"]] != [m["val_action_l1"] for m in plain["history"]]
    weights = {name: load_main(tmp_path / name, "cpu", None).state_dict() for name in ("plain", "averaged")}
    assert not all(torch.allclose(weights["averaged"][k], v) for k, v in weights["plain"].items())
    with pytest.raises(ConfigError, match="ema_decay"):
        PolicyTrainConfig(ema_decay=1.0)


def test_the_object_state_loss_trains_a_head_the_saved_policy_does_not_hold(demos, tmp_path):
    train = dataclasses.replace(get_preset("tiny").policy_train, epochs=2, batch_size=16, val_fraction=0.34)
    plain = train_policy(demos / "demos.hdf5", demos / "tokenizer", tmp_path / "plain", train=train, options=PolicyTrainConfig(select_by="val_l1"),
                         progress=False)
    options = PolicyTrainConfig(select_by="val_l1", object_loss=1.0)
    supervised = train_policy(demos / "demos.hdf5", demos / "tokenizer", tmp_path / "supervised", train=train, options=options, progress=False)
    assert plain["object_state_dims"] is None and supervised["object_state_dims"] == 8
    assert "train_object_mse" not in plain["history"][0] and "val_object_mse" not in plain["history"][0]
    assert all(m["train_object_mse"] > 0 and m["val_object_mse"] > 0 for m in supervised["history"])
    assert [m["train_loss"] for m in supervised["history"]] != pytest.approx([m["train_loss"] for m in plain["history"]])
    loaded = {name: load_main(tmp_path / name, "cpu", None) for name in ("plain", "supervised")}
    assert set(loaded["plain"].state_dict()) == set(loaded["supervised"].state_dict())  # the head is training's alone
    assert not hasattr(loaded["supervised"], "object_head")
    without = tmp_path / "without.hdf5"  # data recording no object state: trained without the loss, and said so in the summary
    with h5py.File(demos / "demos.hdf5", "r") as source, h5py.File(without, "w") as target:
        source.copy("data", target)
        for name in target["data"]:
            del target[f"data/{name}/obs/object"]
    summary = train_policy(without, demos / "tokenizer", tmp_path / "p3", train=train, options=options, progress=False)
    assert summary["object_state_dims"] is None and "train_object_mse" not in summary["history"][0]


def test_object_targets_are_standardised_on_the_training_frames(demos):
    from rsd.data.dataset import FrameDataset
    from rsd.training.policy import _object_targets

    dataset = FrameDataset(read_demos(demos / "demos.hdf5"), 8)
    rows = np.flatnonzero(dataset.episode_ids != dataset.episode_ids[-1])
    targets = _object_targets(dataset, rows, "demos.hdf5").numpy()
    assert targets.shape == (len(dataset), 8)
    np.testing.assert_allclose(targets[rows].mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(targets[rows].std(axis=0), 1.0, atol=1e-3)
    with pytest.raises(ConfigError, match="object_loss"):
        PolicyTrainConfig(object_loss=-1.0)


@pytest.mark.slow
@pytest.mark.skipif(cpu_compiler() is None, reason="torch.compile on a CPU needs a C++ compiler ($CXX or g++) and Python.h")
def test_a_compiled_training_forward_trains_the_same_model(demos, tmp_path):
    """`compile=True` changes the kernels, not the step: the same losses and weights as eager to float32 rounding (with a
    partial last batch, run eagerly, and validation between epochs)."""
    from torch._dynamo.utils import counters

    train = dataclasses.replace(get_preset("tiny").policy_train, epochs=2, batch_size=16, val_fraction=0.34)
    graphs = counters["stats"]["unique_graphs"]
    runs = {name: train_policy(demos / "demos.hdf5", demos / "tokenizer", tmp_path / name, train=train,
                               options=PolicyTrainConfig(select_by="val_l1", object_loss=1.0, compile=name == "compiled"), progress=False)
            for name in ("eager", "compiled")}
    assert runs["compiled"]["options"]["compile"] is True and runs["eager"]["options"]["compile"] is False
    assert counters["stats"]["unique_graphs"] > graphs  # the decoder layers did run compiled
    for key in ("train_loss", "val_action_l1"):
        assert [m[key] for m in runs["compiled"]["history"]] == pytest.approx([m[key] for m in runs["eager"]["history"]], rel=1e-4)
    weights = {name: load_main(tmp_path / name, "cpu", None).state_dict() for name in runs}
    eager, compiled = (torch.cat([w.flatten().double() for w in weights[name].values()]) for name in ("eager", "compiled"))
    assert float((compiled - eager).norm() / eager.norm()) < 1e-4  # measured 5e-6: Adam turns float32 rounding into steps of ~1e-4 at most
    assert float((compiled - eager).abs().max()) < 1e-3
    with pytest.raises(ConfigError, match="compile"):
        PolicyTrainConfig(compile=1)


def test_compiling_without_a_cpu_compiler_is_refused_before_training(demos, tmp_path, monkeypatch):
    monkeypatch.setattr("rsd.training.policy.cpu_compiler", lambda: None)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        train_policy(demos / "demos.hdf5", demos / "tokenizer", tmp_path / "policy", options=PolicyTrainConfig(select_by="val_l1", compile=True),
                     progress=False)
    assert not (tmp_path / "policy").exists()
