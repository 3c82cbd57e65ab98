"""rsd.distributed: shares, batch weights, the torchrun environment, and two local gloo ranks started by `run_local`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsd import distributed
from rsd.distributed import World, run_local, world_from_env
from rsd.errors import ConfigError


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_shards_are_disjoint_deterministic_and_complete(size: int) -> None:
    items = list(range(17))
    shares = [World(rank, size).shard(items) for rank in range(size)]
    assert sorted(x for share in shares for x in share) == items
    assert shares == [World(rank, size).shard(items) for rank in range(size)]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize(("batch", "size"), [(32, 1), (32, 2), (7, 3), (2, 4)])
def test_batch_share_weights_turn_rank_means_into_the_global_mean(batch: int, size: int) -> None:
    losses = np.random.default_rng(batch + size).normal(size=batch)  # one loss per row of a global batch
    averaged, seen = 0.0, []
    for rank in range(size):
        mine, weight = World(rank, size).batch_share(batch)
        averaged += losses[mine].mean() * weight / size  # DDP averages the ranks' weighted mean losses
        seen += mine.tolist() if weight else []
    assert sorted(seen) == list(range(batch))
    assert averaged == pytest.approx(losses.mean(), rel=1e-12)


def test_world_from_env_reads_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert world_from_env() == World(0, 1, 0) and distributed.current() == World()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = world_from_env()
    assert (world.rank, world.world_size, world.local_rank, world.is_main) == (3, 4, 1, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="RANK"):
        world_from_env()
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        world_from_env()


def test_parallel_refuses_an_unknown_strategy() -> None:
    with pytest.raises(ConfigError, match="ddp"):
        distributed.Parallel(torch.nn.Linear(2, 2), lambda m, x: m(x), strategy="zero")


def _ranks_report() -> tuple[World, float, list[int], bool]:
    with distributed.session() as world:
        total = float(world.sum(torch.tensor([world.rank + 1.0]))[0])
        gathered = world.gather(world.rank * 10)
        world.barrier()
        joined = torch.distributed.is_initialized()
    return world, total, gathered, joined and not torch.distributed.is_initialized()


@pytest.mark.distributed
def test_run_local_starts_ranks_that_join_one_group_and_reduce() -> None:
    results = run_local(2, _ranks_report, start_method="fork")
    assert [r[0] for r in results] == [World(0, 2, 0), World(1, 2, 1)]
    assert all(total == 3.0 and gathered == [0, 10] and left for _, total, gathered, left in results)
