"""Cluster-level distillation (CLIP-CID §3.2): a PartialFC classifier over the k teacher clusters.

The classifier W (k x D_teacher) starts as the k-means centroids (the paper: training collapses
without this) and is split by rows across ranks, as in insightface/unicom PartialFC_V2. Each step:

1. all labels of the global batch are gathered; each rank samples its part of the classes: every
   positive class it holds plus random negatives, `sample_rate` of its classes in all;
2. logits = s * cos(student embedding, W_sampled), with an optional ArcFace margin m on the target;
   teacher logits = s * cos(teacher embedding, W_sampled), without gradient;
3. softmax over the sampled classes of every rank at once (a global max and a global sum), giving
   L_cls = cross-entropy against the pseudo-label and
   L_kl = T^2 * KL(softmax(z_T / T) || softmax(z_S / T)).

Both losses are means over the global batch and equal on every rank (see losses/distributed.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipcid.losses.collectives import all_reduce_max_no_grad, all_reduce_sum, gather_no_grad, gather_with_grad, world


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous rows [start, end) of the classifier held by `rank` (the first ranks get one more)."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _log_softmax_global(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the class dimension of every rank's shard together."""
    shift = all_reduce_max_no_grad(logits.max(dim=1, keepdim=True).values)
    exp_sum = all_reduce_sum(torch.exp(logits - shift).sum(dim=1, keepdim=True))
    return logits - shift - torch.log(exp_sum)


class PartialFC(nn.Module):
    def __init__(
        self,
        centroids: torch.Tensor | None,
        num_classes: int,
        dim: int,
        scale: float = 32.0,
        margin: float = 0.0,
        sample_rate: float = 1.0,
        kl_temperature: float = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        self.rank, self.world_size = world()
        self.num_classes, self.dim = num_classes, dim
        self.start, self.end = shard_range(num_classes, self.rank, self.world_size)
        if centroids is not None:
            if tuple(centroids.shape) != (num_classes, dim):
                raise ValueError(f"centroids are {tuple(centroids.shape)}, expected {(num_classes, dim)}")
            local = centroids[self.start : self.end].float().clone()
        else:  # --fc-init random: the ablation the paper says collapses
            generator = torch.Generator().manual_seed(seed + self.rank)
            local = F.normalize(torch.randn(self.end - self.start, dim, generator=generator), dim=1)
        self.weight = nn.Parameter(local)
        self.scale, self.margin, self.sample_rate, self.kl_temperature = scale, margin, sample_rate, kl_temperature
        self.generator = torch.Generator().manual_seed(seed * 1000 + self.rank)

    @property
    def num_local(self) -> int:
        return self.end - self.start

    def sample(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices of the sampled local classes, labels remapped to positions in them or -1)."""
        local = (labels >= self.start) & (labels < self.end)
        positives = torch.unique(labels[local] - self.start)
        num_sample = min(self.num_local, max(len(positives), math.ceil(self.sample_rate * self.num_local)))
        if num_sample >= self.num_local:
            index = torch.arange(self.num_local, device=labels.device)
        else:
            priority = torch.rand(self.num_local, generator=self.generator).to(labels.device)
            priority[positives] = 2.0  # every positive class is sampled
            index = torch.topk(priority, num_sample).indices.sort().values
        remap = torch.full((self.num_local,), -1, dtype=torch.long, device=labels.device)
        remap[index] = torch.arange(len(index), device=labels.device)
        target = torch.full_like(labels, -1)
        target[local] = remap[labels[local] - self.start]
        return index, target

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """student: B x D (already projected to the teacher's dimension), teacher: B x D, labels: B
        (cluster ids; rows with label -1 are ignored). Returns {'cls', 'kl'} over the global batch."""
        student = gather_with_grad(F.normalize(student.float(), dim=1))
        teacher = gather_no_grad(F.normalize(teacher.float(), dim=1))
        labels = gather_no_grad(labels)
        keep = labels >= 0
        index, target = self.sample(labels)
        weight = F.normalize(self.weight[index], dim=1)
        cos_s = student @ weight.T
        cos_ce = cos_s
        if self.margin > 0:  # ArcFace: the target's angle grows by m, for the cross-entropy only
            rows = torch.nonzero(target >= 0).squeeze(1)
            theta = torch.acos(cos_s[rows, target[rows]].clamp(-1 + 1e-7, 1 - 1e-7))
            cos_ce = cos_s.index_put((rows, target[rows]), torch.cos(theta + self.margin))
        logits_s = self.scale * cos_s
        with torch.no_grad():
            logits_t = self.scale * (teacher @ weight.T)
        n = keep.sum().clamp_min(1)

        log_p = _log_softmax_global(self.scale * cos_ce)
        has_target = target >= 0
        picked = torch.zeros_like(labels, dtype=log_p.dtype)
        picked[has_target] = log_p[has_target, target[has_target]]
        cls = -all_reduce_sum(picked[keep].sum()) / n

        t = self.kl_temperature
        log_p_s = _log_softmax_global(logits_s / t)
        with torch.no_grad():
            log_p_t = _log_softmax_global(logits_t / t)
        kl_rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
        kl = t * t * all_reduce_sum(kl_rows[keep].sum()) / n
        return {"cls": cls, "kl": kl}

    def finish_backward(self) -> None:
        """Undo the world_size factor the summing collectives put on this shard's gradient (no DDP
        average does it for a parameter that lives on one rank only)."""
        if self.world_size > 1 and self.weight.grad is not None:
            self.weight.grad.div_(self.world_size)
