"""Multi-process training helpers: process group from the ``torchrun`` environment, device choice,
data sharding and reductions. Nothing here changes behaviour with the world size except sharding.

``torchrun --nproc_per_node G [--nnodes M ...] -m occdistill train CONFIG`` sets RANK, LOCAL_RANK
and WORLD_SIZE; a plain ``occdistill train`` is one process of world size 1. Backend: NCCL on CUDA,
gloo on CPU. Only rank 0 writes files and shows progress (:attr:`DistContext.is_main`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from occdistill.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this process created the process group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistContext:
    """Join the process group described by the ``torchrun`` environment (no-op for one process).

    ``device`` is the configured device string; it picks the backend.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():  # the caller set the group up
        return DistContext(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size())
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, owns_group=True)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(device: str, ctx: DistContext) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU; ``cuda`` -> this rank's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", ctx.local_rank)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={device!r} but CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"runtime.device={device!r} is not a torch device ({exc})") from exc


def cpu_threads(requested: int, workers: int) -> int:
    """Intra-op threads for this process: ``requested``, or with 0 the CPUs left per local process
    once ``workers`` loader processes have one each (at least 1)."""
    if requested > 0:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cpus // local_procs - workers)


def metric_device(ctx: DistContext, device: torch.device) -> torch.device:
    """Where metric counts accumulate: the CPU, except under NCCL, which reduces CUDA tensors only."""
    if ctx.distributed and dist.get_backend() == "nccl":
        return device
    return torch.device("cpu")


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place sum over processes; returns ``t``."""
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


class ResumableSampler(Sampler[int]):
    """Training order: :class:`DistributedSampler` (shuffled by seed + epoch, one shard per rank,
    tail dropped), started ``skip`` samples into this rank's shard.

    The order depends only on (seed, epoch, rank, world size), so a run resumed mid-epoch sees
    exactly the samples an uninterrupted run would have seen next.
    """

    def __init__(self, dataset: Sized, ctx: DistContext, seed: int):
        self.base = DistributedSampler(
            dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True
        )
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.base)[self.skip :])

    def __len__(self) -> int:
        return len(self.base) - self.skip

    @property
    def shard_size(self) -> int:
        """Samples per rank and epoch."""
        return len(self.base)


def broadcast_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics): after a step each rank's buffers
    hold its own last batch, and evaluation or a saved model must not depend on the rank."""
    if ctx.distributed:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)
