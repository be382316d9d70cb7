"""Run under torchrun by tests/test_losses.py: each rank takes its half of a fixed global batch and its
shard of the classifier, computes the CID losses and backward, and saves what it got."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from clipcid.losses.instance import InstanceDistillLoss
from clipcid.losses.partial_fc import PartialFC


def fixed_problem(seed: int = 0, batch: int = 8, dim: int = 16, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    return {
        "student": torch.randn(batch, dim, generator=g),
        "teacher": torch.randn(batch, dim, generator=g),
        "txt_s": torch.randn(batch, dim, generator=g),
        "txt_t": torch.randn(batch, dim, generator=g),
        "labels": torch.randint(0, classes, (batch,), generator=g),
        "centroids": torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1),
    }


def run(problem: dict, rows: slice, margin: float = 0.2) -> dict:
    student = problem["student"][rows].clone().requires_grad_(True)
    txt_s = problem["txt_s"][rows].clone().requires_grad_(True)
    pfc = PartialFC(
        problem["centroids"],
        len(problem["centroids"]),
        problem["student"].shape[1],
        scale=16.0,
        margin=margin,
        sample_rate=1.0,
        kl_temperature=2.0,
    )
    ins = InstanceDistillLoss()
    losses = pfc(student, problem["teacher"][rows], problem["labels"][rows])
    losses["ins"] = ins(student, txt_s, problem["teacher"][rows], problem["txt_t"][rows])
    (losses["cls"] + losses["kl"] + losses["ins"]).backward()
    pfc.finish_backward()
    return {
        "losses": {k: v.item() for k, v in losses.items()},
        "grad_student": student.grad,
        "grad_txt": txt_s.grad,
        "grad_weight": pfc.dense_grad(),
        "shard": (pfc.start, pfc.end),
        "grad_scale": ins.logit_scale.grad,
    }


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    problem = fixed_problem()
    per = len(problem["labels"]) // size
    result = run(problem, slice(rank * per, (rank + 1) * per))
    torch.save(result, f"{sys.argv[1]}/rank{rank}.pt")
    dist.destroy_process_group()
