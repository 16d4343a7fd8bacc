"""Data-parallel plumbing for torchrun: start the process group from the environment, keep ranks in step.

    torchrun --nproc-per-node 2 -m sae_fast train --shards acts/ --out sae/      # 2 processes, one SAE

torchrun sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK; `init_from_env()` turns them into a
process group (NCCL when CUDA is available, each rank on cuda:LOCAL_RANK; gloo on the CPU). The trainer then
averages gradients and dead-latent counters over the group and only rank 0 writes; the shard loader gives each
rank its slice of every global batch (`sae_fast.activations.loader`), and extraction splits the cells.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the initialised torch.distributed group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Initialise torch.distributed if launched by torchrun with WORLD_SIZE > 1; return (rank, world_size)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shutdown(*, wait: bool = True) -> None:
    """Destroy the process group if one is running, after a barrier (`wait`): a rank that tears gloo down while
    another still writes its files can abort ('terminate called without an active exception')."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group():
    """`with process_group() as (rank, world_size):` around a torchrun job; a no-op for a single process."""
    started = not (dist.is_available() and dist.is_initialized())
    ok = False
    try:
        yield init_from_env()
        ok = True
    finally:
        if started:
            shutdown(wait=ok)  # after an error the other ranks may never reach a barrier


def min_over_ranks(value: int) -> int:
    """The smallest `value` over all ranks (a tensor on the backend's device: NCCL needs CUDA)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def lockstep(stream):
    """Yield from `stream` while every rank still has an item: ranks whose data ran out early stop the others,
    so that each step's collective operations pair up (one tiny all-reduce per item)."""
    it = iter(stream)
    try:
        while True:
            item = next(it, None)
            if not min_over_ranks(item is not None):
                return
            yield item
    finally:
        if hasattr(it, "close"):  # a generator (the shard loader's) stops its threads now
            it.close()
