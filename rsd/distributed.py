"""Scale-out on torch.distributed: which rank this process is, the process group, deterministic shares, reductions.

rsd brings no launcher of its own: `torchrun` (one machine or several) starts the processes and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and every command runs unchanged in each process.
`session()` joins the process group those variables describe and leaves it at the end; without them the process
is alone and every operation here is the identity. The backend is gloo: rsd's own collectives carry CPU tensors
and objects (counts, losses, reports, barriers) and the training loops run on the CPU, while feature collection
and evaluation put each rank on its own GPU (`World.device`) without any collective on it. What the
steps do with their rank:

- collect-features: rank r computes shards r, r + W, r + 2W, ... of a plan that does not depend on W; rank 0
  writes the index after a barrier.
- train-*: every rank walks the same seeded global batches and computes its slice of each (`World.batch_share`);
  DDP (or FSDP) averages the gradients, so the weights equal one process with the same global batch.
- eval: rank r plays `World.shard(seeds)`; the reports are gathered and merged on rank 0.

Only rank 0 writes checkpoints and reports (`World.is_main`). `run_local` starts N local ranks with torch's own
elastic launcher (the code torchrun runs) for `rsd eval --workers N` and the tests.

Usage:
    torchrun --nproc-per-node 2 -m rsd.cli train-draft --features runs/demo/features --out runs/demo/draft
    with session() as world:
        mine = world.shard(items)                 # items[rank::world_size]
        total = world.sum(torch.tensor([len(mine)]))
"""

from __future__ import annotations

import copy
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rsd.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
STRATEGIES = ("ddp", "fsdp")  # how `Parallel` spreads a model over the ranks
FSDP_UNITS = ("LlamaDecoderLayer",)  # module classes FSDP shards as units of their own (the rest is the root unit)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of the process group (rank 0 of 1 without one)."""

    rank: int = 0  # global rank, 0 .. world_size - 1
    world_size: int = 1  # processes in the group
    local_rank: int = 0  # rank on this machine (the CUDA device index)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, indexes and reports."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items`: every world_size-th item from position `rank` (disjoint, deterministic)."""
        return list(items)[self.rank :: self.world_size]

    def batch_share(self, size: int) -> tuple[np.ndarray, float]:
        """Positions of a global batch of `size` rows this rank computes, and the weight of its mean loss.

        The rows are cut into world_size contiguous near-equal slices. Scaling a rank's mean loss by
        `len(slice) * world_size / size` makes the average of the ranks' gradients (what DDP and FSDP compute)
        the gradient of the mean loss over the whole batch, also when the slices differ in size. A rank whose
        slice is empty (size < world_size) computes row 0 with weight 0, so it still joins the all-reduce.
        """
        mine = np.array_split(np.arange(size), self.world_size)[self.rank]
        if mine.size == 0:
            return np.zeros(1, dtype=np.int64), 0.0
        return mine, mine.size * self.world_size / size

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `tensor` over all ranks (a new tensor; `tensor` itself alone)."""
        if self.world_size == 1:
            return tensor.clone()
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        """Wait until every rank got here."""
        if self.world_size > 1:
            dist.barrier()

    def device(self, device: torch.device) -> torch.device:
        """`device` for this rank: a CUDA device without an index becomes `cuda:<local_rank>` (and the current one)."""
        if device.type == "cuda" and device.index is None and self.world_size > 1:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as error:
        raise ConfigError(f"environment {name}: expected an integer (as torchrun sets it), got {value!r}.") from error


def world_from_env() -> World:
    """The World that torchrun's RANK / WORLD_SIZE / LOCAL_RANK describe (a single process when they are unset)."""
    rank, size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"environment RANK / WORLD_SIZE: expected 0 <= RANK < WORLD_SIZE, got RANK={rank} WORLD_SIZE={size}.")
    return World(rank, size, _env_int("LOCAL_RANK", rank))


def current() -> World:
    """This process's World: from the initialised process group, else a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    rank = dist.get_rank()
    return World(rank, dist.get_world_size(), _env_int("LOCAL_RANK", rank))


def init(backend: str = "gloo") -> World:
    """Join the process group the torchrun environment describes (no-op alone or when already joined)."""
    world = world_from_env()
    if world.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=world.rank, world_size=world.world_size)
        log.info("rank %d of %d (local rank %d), backend %s", world.rank, world.world_size, world.local_rank, backend)
    return current()


def teardown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def session(backend: str = "gloo") -> Iterator[World]:
    """`init()` on entry, `teardown()` on exit: what every rsd command runs inside."""
    world = init(backend)
    try:
        yield world
    finally:
        teardown()


class Forward(nn.Module):
    """A module whose forward is `function(module, *args)`, so DDP and FSDP see the call (MainModel and DraftHead
    are used through methods, not one `forward`)."""

    def __init__(self, module: nn.Module, function: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self.function = function

    def forward(self, *args: Any) -> Any:
        """`function(module, *args)`."""
        return self.function(self.module, *args)


class Parallel:
    """A module spread over the ranks for training: call it in the training step, gather it to validate, save its copy.

    `strategy="ddp"` keeps a full replica on every rank and averages the gradients after each backward pass
    (`find_unused_parameters` for modules with trainable parameters `function` does not reach).
    `strategy="fsdp"` (torch's `fully_shard`) shards the trainable parameters over the ranks, every
    `FSDP_UNITS` layer as a unit of its own; frozen parameters stay whole on every rank. Alone (one process)
    both are the plain module.
    """

    def __init__(self, module: nn.Module, function: Callable[..., Any], strategy: str = "ddp", find_unused_parameters: bool = False) -> None:
        if strategy not in STRATEGIES:
            raise ConfigError(f"parallel strategy: expected one of {list(STRATEGIES)}, got {strategy!r}.")
        self.module = module
        self.strategy = strategy
        self.world = current()
        self.replica: nn.Module | None = None  # FSDP, rank 0: the unsharded copy `for_saving` fills
        model: nn.Module = Forward(module, function)
        if self.world.world_size > 1 and strategy == "ddp":
            device = next(module.parameters()).device
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                        find_unused_parameters=find_unused_parameters)
        elif self.world.world_size > 1:
            from torch.distributed.fsdp import fully_shard

            if self.world.is_main:  # what rank 0 saves: the full state is gathered into it (on the CPU)
                self.replica = copy.deepcopy(module).cpu()
            frozen = {p for p in module.parameters() if not p.requires_grad}
            for unit in module.modules():
                if type(unit).__name__ in FSDP_UNITS and any(p.requires_grad for p in unit.parameters()):
                    fully_shard(unit, ignored_params=frozen & set(unit.parameters()))
            fully_shard(model, ignored_params=frozen)
        self.model = model

    def __call__(self, *args: Any) -> Any:
        return self.model(*args)

    @property
    def _sharded(self) -> bool:
        return self.world.world_size > 1 and self.strategy == "fsdp"

    def _fsdp_units(self) -> list[nn.Module]:
        if not self._sharded:
            return []
        from torch.distributed.fsdp import FSDPModule

        return [m for m in self.model.modules() if isinstance(m, FSDPModule)]

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Inside: the module's parameters are whole on every rank and its forward makes no collective call, so
        ranks may run it a different number of times (validation, rollouts). A no-op except under FSDP."""
        units = self._fsdp_units()
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(unit is not self.model, recurse=False)  # fully_shard's defaults

    def for_saving(self) -> nn.Module | None:
        """The module with the current weights on rank 0, None on the others (a collective call under FSDP)."""
        if not self._sharded:
            return self.module if self.world.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.replica is None:
            return None
        self.replica.load_state_dict(state)
        return self.replica


def _run_rank(function: Callable[..., T], threads: int, args: tuple[Any, ...]) -> T:
    torch.set_num_threads(threads)
    return function(*args)


def run_local(nprocs: int, function: Callable[..., T], *args: Any, start_method: str = "spawn") -> list[T]:
    """Run `function(*args)` in `nprocs` local ranks started by torch's elastic launcher; their results in rank order.

    Each rank finds the torchrun environment set (so `session()` joins a group of `nprocs`) and gets its share of
    this process's torch threads (at least one). `start_method="spawn"` works from any process; "fork" starts
    the ranks in a second instead of importing torch again, but only from a process that holds no CUDA context,
    and ranks that run a backward pass fail if this process's autograd already started threads.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nprocs < 1:
        raise ConfigError(f"run_local.nprocs: expected an int >= 1, got {nprocs}.")
    if start_method not in ("spawn", "fork"):
        raise ConfigError(f"run_local.start_method: expected 'spawn' or 'fork', got {start_method!r}.")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1, start_method=start_method)
    threads = max(1, min(torch.get_num_threads(), os.cpu_count() or 1) // nprocs)
    results = elastic_launch(config, _run_rank)(function, threads, args)
    return [results[rank] for rank in range(nprocs)]
