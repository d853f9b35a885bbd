"""One process or many under torchrun: the process group, DDP / FSDP2 wrapping, reductions.

The recipe is docs/distributed.md's: DDP is built after ``set_phase`` (it hooks the parameters
that require grad when built), FSDP2 shards each denoising layer and the root, and its
label-free denoiser phase feeds inputs that require grad.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from . import UsageError


@dataclass
class Processes:
    rank: int
    world: int
    device: torch.device
    fsdp: bool

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def start(fsdp: bool) -> Processes:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1): NCCL on GPUs, gloo
    on CPUs; one process otherwise. Each process uses the GPU of its LOCAL_RANK, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world == 1:
        if fsdp:
            raise UsageError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node=N")
        return Processes(0, 1, device, False)
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return Processes(dist.get_rank(), world, device, fsdp)


def stop(procs: Processes) -> None:
    if procs.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(model: nn.Module, layer_types: tuple[type, ...]) -> None:
    """FSDP2: each layer of ``layer_types`` (its own all-gather, freed after use), then the root."""
    from torch.distributed.fsdp import fully_shard

    for module in [m for m in model.modules() if isinstance(m, layer_types)]:
        fully_shard(module)
    fully_shard(model)


def for_training(model: nn.Module, procs: Processes) -> nn.Module:
    """What the training forward calls in the current phase: a fresh DDP wrapper (it must be
    rebuilt after set_phase), the sharded model itself, or the model."""
    if procs.distributed and not procs.fsdp:
        ids = [procs.device.index] if procs.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def total(values: torch.Tensor, procs: Processes, largest: bool = False) -> torch.Tensor:
    """``values`` summed over the processes (their maximum with ``largest``)."""
    if procs.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX if largest else dist.ReduceOp.SUM)
    return values


def gather(obj: Any, procs: Processes) -> list[Any]:
    """Every process's ``obj``, by rank."""
    if not procs.distributed:
        return [obj]
    out: list[Any] = [None] * procs.world
    dist.all_gather_object(out, obj)
    return out
