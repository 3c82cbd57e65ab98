"""Demonstration recording through the environment registry: any env with an expert, the file it writes, refusals."""

from __future__ import annotations

import json

import h5py
import pytest

from rsd.data.hdf5 import read_demos
from rsd.envs.base import expert_factory, make_env
from rsd.envs.demos import generate_demos
from rsd.envs.expert import ScriptedExpert
from rsd.errors import ConfigError


def test_tabletop_demos_are_recorded_with_the_options_given(tmp_path) -> None:
    summary = generate_demos("tabletop", episodes=3, out=tmp_path / "d.hdf5", seed=5, image_size=32, progress=False,
                             task_family="pick_place")
    episodes = read_demos(tmp_path / "d.hdf5")
    assert summary["episodes"] == len(episodes) >= 2 and summary["episodes"] + summary["failed"] == 3
    assert all(e.images["agentview"].shape[1:] == (32, 32, 3) and e.instruction.startswith("pick up") for e in episodes)
    with h5py.File(tmp_path / "d.hdf5") as handle:
        env_args = json.loads(handle["data"].attrs["env_args"])
    assert env_args["env_kwargs"] == {"image_size": 32, "task_family": "pick_place"}


def test_expert_registry() -> None:
    env = make_env("tabletop")
    assert isinstance(expert_factory("tabletop")(env), ScriptedExpert)
    with pytest.raises(ConfigError, match="scripted expert"):
        expert_factory("libero:libero_spatial/0")
    with pytest.raises(ConfigError, match="Did you mean 'tabletop'"):
        expert_factory("tabeltop")


def test_bad_requests_are_refused_before_anything_runs(tmp_path) -> None:
    with pytest.raises(ConfigError, match="episodes"):
        generate_demos("tabletop", episodes=0, out=tmp_path / "d.hdf5")
    with pytest.raises(ConfigError, match="scripted expert"):
        generate_demos("libero:libero_spatial/0", episodes=1, out=tmp_path / "d.hdf5")
    assert not (tmp_path / "d.hdf5").exists()
