"""Differentiable collectives with one convention for every distributed loss here.

Every rank computes the same global loss from gathered or reduced tensors, and every collective is
differentiable with a summing backward (torch.distributed.nn). A rank's local tensors therefore get
world_size x their true gradient; DDP's averaging of the student's gradients divides that back out,
as in open_clip's ClipLoss(gather_with_grad=True). Parameters outside DDP (the sharded classifier)
must divide their gradients by world_size themselves: see `PartialFC.finish_backward`.
In one process every function here is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank along dim 0, in rank order; gradients flow back to each rank."""
    _, size = world()
    if size == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    _, size = world()
    if size == 1:
        return x
    out = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    _, size = world()
    if size == 1:
        return x
    return dist_fn.all_reduce(x, op=dist.ReduceOp.SUM)


def all_reduce_max_no_grad(x: torch.Tensor) -> torch.Tensor:
    _, size = world()
    if size == 1:
        return x.detach()
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out
