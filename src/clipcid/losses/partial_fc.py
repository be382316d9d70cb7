"""Cluster-level distillation (CLIP-CID §3.2): a PartialFC classifier over the k teacher clusters.

The classifier W (k x D_teacher) starts as the k-means centroids (the paper: training collapses
without this) and is split by rows across ranks, as in insightface/unicom PartialFC_V2. Each step:

1. all labels of the global batch are gathered; each rank samples its part of the classes on the
   device: every positive class it holds plus random negatives, `sample_rate` of its classes in all
   (at least as many as the global batch has rows, so that every positive fits: a size known before
   the step, so nothing waits for the device);
2. only the sampled rows take part: they are copied into a leaf tensor for this step, so autograd
   never builds a k x D gradient; logits = s * cos(student embedding, W_sampled), with an optional
   ArcFace margin m on the target; teacher logits = s * cos(teacher embedding, W_sampled), no gradient;
3. softmax over the sampled classes of every rank at once (a global max and a global sum), giving
   L_cls = cross-entropy against the pseudo-label and
   L_kl = T^2 * KL(softmax(z_T / T) || softmax(z_S / T)).
4. `step(lr)` updates the sampled rows with AdamW, their moments too; rows not sampled keep their
   weights and their moments until they are sampled again ("lazy" AdamW, as PartialFC does; the bias
   correction uses the classifier's step count). With every class sampled this is exactly
   torch.optim.AdamW.

Both losses are means over the global batch and equal on every rank (see losses/collectives.py).
Nothing in the loss path reads a value back to the host: no boolean indexing, no unique, no nonzero.
"""

from __future__ import annotations

import math

import numpy as np
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
        centroids: torch.Tensor | np.ndarray | None,
        num_classes: int,
        dim: int,
        scale: float = 32.0,
        margin: float = 0.0,
        sample_rate: float = 1.0,
        kl_temperature: float = 1.0,
        seed: int = 0,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
    ):
        super().__init__()
        self.rank, self.world_size = world()
        self.num_classes, self.dim = num_classes, dim
        self.start, self.end = shard_range(num_classes, self.rank, self.world_size)
        if centroids is not None:
            if tuple(centroids.shape) != (num_classes, dim):
                raise ValueError(f"centroids are {tuple(centroids.shape)}, expected {(num_classes, dim)}")
            # Only this rank's rows are copied: the k x D centroids may be a memory map (Clusters.open).
            part = centroids[self.start : self.end]
            local = (
                part.float().clone()
                if isinstance(part, torch.Tensor)
                else torch.from_numpy(np.array(part, dtype=np.float32))
            )
        else:  # --fc-init random: the ablation the paper says collapses
            generator = torch.Generator().manual_seed(seed + self.rank)
            local = F.normalize(torch.randn(self.end - self.start, dim, generator=generator), dim=1)
        # Buffers, not parameters: the classifier has its own (lazy) AdamW in `step`.
        self.register_buffer("weight", local)
        self.register_buffer("exp_avg", torch.zeros_like(local))
        self.register_buffer("exp_avg_sq", torch.zeros_like(local))
        self.steps = 0
        self.scale, self.margin, self.sample_rate, self.kl_temperature = scale, margin, sample_rate, kl_temperature
        self.betas, self.eps = betas, eps
        self.seed = seed * 1000 + self.rank
        self.generator = torch.Generator().manual_seed(self.seed)  # moved to the device with the first batch
        self.active: torch.Tensor | None = None  # this step's sampled rows, a leaf with a gradient
        self.index: torch.Tensor | None = None

    @property
    def num_local(self) -> int:
        return self.end - self.start

    def num_sample(self, global_batch: int) -> int:
        """How many local classes a step uses: sample_rate of them, at least the global batch's rows
        (every positive must fit), at most all of them. A function of sizes only."""
        return min(self.num_local, max(math.ceil(self.sample_rate * self.num_local), global_batch))

    def _generator_on(self, device: torch.device) -> torch.Generator:
        if self.generator.device != device:
            state = None if device.type != "cpu" else self.generator.get_state()
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
            if state is not None:
                self.generator.set_state(state)
        return self.generator

    def sample(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices of the sampled local classes, ascending; labels remapped to positions in them or -1)."""
        device = labels.device
        local = (labels >= self.start) & (labels < self.end)
        position = torch.where(local, labels - self.start, self.num_local)  # num_local: a bin for the rest
        num_sample = self.num_sample(len(labels))
        if num_sample >= self.num_local:
            index = torch.arange(self.num_local, device=device)
        else:
            positive = torch.zeros(self.num_local + 1, device=device)
            positive[position] = 1.0
            priority = torch.rand(self.num_local, generator=self._generator_on(device), device=device)
            priority = priority + 2.0 * positive[: self.num_local]  # every positive is sampled
            index = torch.topk(priority, num_sample, sorted=False).indices.sort().values
        remap = torch.full((self.num_local + 1,), -1, dtype=torch.long, device=device)
        remap[index] = torch.arange(len(index), device=device)
        return index, remap[position]

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """student: B x D (already projected to the teacher's dimension), teacher: B x D, labels: B
        (cluster ids; rows with label -1 are ignored). Returns {'cls', 'kl'} over the global batch."""
        student = gather_with_grad(F.normalize(student.float(), dim=1))
        teacher = gather_no_grad(F.normalize(teacher.float(), dim=1))
        labels = gather_no_grad(labels)
        keep = (labels >= 0).float()
        self.index, target = self.sample(labels)
        self.active = self.weight[self.index].detach().requires_grad_(True)
        weight = F.normalize(self.active, dim=1)
        cos_s = student @ weight.T
        has_target = target >= 0
        column = target.clamp(min=0)[:, None]
        cos_ce = cos_s
        if self.margin > 0:  # ArcFace: the target's angle grows by m, for the cross-entropy only
            target_cos = cos_s.gather(1, column).clamp(-1 + 1e-7, 1 - 1e-7)
            with_margin = torch.cos(torch.acos(target_cos) + self.margin)
            is_target = torch.zeros_like(cos_s, dtype=torch.bool).scatter_(1, column, has_target[:, None])
            cos_ce = torch.where(is_target, with_margin.expand_as(cos_s), cos_s)
        logits_s = self.scale * cos_s
        with torch.no_grad():
            logits_t = self.scale * (teacher @ weight.T)
        n = keep.sum().clamp_min(1)

        log_p = _log_softmax_global(self.scale * cos_ce)
        picked = log_p.gather(1, column).squeeze(1) * has_target
        cls = -all_reduce_sum((picked * keep).sum()) / n

        t = self.kl_temperature
        log_p_s = _log_softmax_global(logits_s / t)
        with torch.no_grad():
            log_p_t = _log_softmax_global(logits_t / t)
        kl_rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
        kl = t * t * all_reduce_sum((kl_rows * keep).sum()) / n
        return {"cls": cls, "kl": kl}

    def finish_backward(self) -> None:
        """Undo the world_size factor the summing collectives put on this shard's gradient (no DDP
        average does it for a classifier that lives on one rank only)."""
        if self.world_size > 1 and self.active is not None and self.active.grad is not None:
            self.active.grad.div_(self.world_size)

    def grad(self) -> torch.Tensor | None:
        """The sampled rows' gradient (for clipping, unscaling and tests), or None."""
        return None if self.active is None else self.active.grad

    def dense_grad(self) -> torch.Tensor:
        """The gradient as a k_local x D matrix (zero outside the sampled rows); for tests."""
        full = torch.zeros_like(self.weight)
        if self.grad() is not None:
            full[self.index] = self.grad()
        return full

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """AdamW (no weight decay: cosine logits ignore the rows' norms) on the sampled rows only, with
        the arithmetic of torch.optim.AdamW's single-tensor path, so that sampling every class gives
        its very numbers."""
        grad = self.grad()
        if grad is None:
            return
        beta1, beta2 = self.betas
        exp_avg, exp_avg_sq, weight = self.exp_avg[self.index], self.exp_avg_sq[self.index], self.active.detach()
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self.steps += 1
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2 = 1 - beta2**self.steps
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.eps)
        weight.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
        self.exp_avg[self.index] = exp_avg
        self.exp_avg_sq[self.index] = exp_avg_sq
        self.weight[self.index] = weight
        self.active = None

    def optimizer_state(self) -> dict:
        return {"steps": self.steps, "generator": self.generator.get_state(), "device": str(self.generator.device)}

    def load_optimizer_state(self, state: dict) -> None:
        self.steps = state["steps"]
        self.generator = torch.Generator(device=state.get("device", "cpu")).manual_seed(self.seed)
        self.generator.set_state(state["generator"])
