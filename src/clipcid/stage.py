"""torch.distributed set-up shared by the stages: torchrun env vars, gloo on CPU, nccl on GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
    return DistEnv(rank, world_size, local_rank, dev)


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
