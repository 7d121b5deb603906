"""Data-parallel training under torchrun (one node): process group, device, and agreement between ranks.

torchrun (or the Flyte Elastic plugin, which runs torch elastic) sets RANK, LOCAL_RANK and
WORLD_SIZE; without them everything here is a no-op and training runs in one process.
NCCL on GPUs, gloo on CPU. Only rank 0 writes checkpoints, the model and artifacts.
"""

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.size > 1


def init() -> World:
    """Join the process group torchrun describes in the environment (idempotent)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")), size=size)
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # A process that exits with its group alive (rank 1 returns while rank 0 still publishes) can
        # abort in the group's destructor ("terminate called without an active exception", SIGABRT).
        atexit.register(_leave)
    return world


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device(world: World) -> torch.device:
    return torch.device(f"cuda:{world.local_rank}" if torch.cuda.is_available() else "cpu")


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank if it is true on any: all ranks stop at the same step."""
    if not world.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device(world))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def from_main(world: World, value: Any) -> Any:
    """Rank 0's `value` on every rank (e.g. which checkpoint to resume from)."""
    if not world.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_all(world: World, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (small objects: pickled)."""
    if not world.enabled:
        return [value]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def barrier(world: World) -> None:
    if world.enabled:
        dist.barrier()


def wrap(model: torch.nn.Module, world: World) -> torch.nn.Module:
    if not world.enabled:
        return model
    ids = [world.local_rank] if torch.cuda.is_available() else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
