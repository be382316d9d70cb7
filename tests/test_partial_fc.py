"""PartialFC made for the GPU (sampling on the device, only sampled rows in the graph, a lazy AdamW over
them, no host synchronisation) keeps the math of the first implementation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from clipcid.losses.partial_fc import PartialFC


def reference_losses(weight, student, teacher, labels, index, scale, margin, t):
    """The first implementation's math, on a dense classifier `weight` (whose .grad autograd fills)
    and the given sampled `index`: boolean indexing and all, one process."""
    remap = torch.full((len(weight),), -1, dtype=torch.long)
    remap[index] = torch.arange(len(index))
    target = torch.full_like(labels, -1)
    local = labels >= 0
    target[local] = remap[labels[local]]
    student = F.normalize(student.float(), dim=1)
    teacher = F.normalize(teacher.float(), dim=1)
    keep = labels >= 0
    w = F.normalize(weight[index], dim=1)
    cos_s = student @ w.T
    cos_ce = cos_s
    if margin > 0:
        rows = torch.nonzero(target >= 0).squeeze(1)
        theta = torch.acos(cos_s[rows, target[rows]].clamp(-1 + 1e-7, 1 - 1e-7))
        cos_ce = cos_s.index_put((rows, target[rows]), torch.cos(theta + margin))
    n = keep.sum().clamp_min(1)
    log_p = F.log_softmax(scale * cos_ce, dim=1)
    has_target = target >= 0
    picked = torch.zeros_like(labels, dtype=log_p.dtype)
    picked[has_target] = log_p[has_target, target[has_target]]
    cls = -picked[keep].sum() / n
    log_p_s = F.log_softmax(scale * cos_s / t, dim=1)
    with torch.no_grad():
        log_p_t = F.log_softmax(scale * (teacher @ w.T) / t, dim=1)
    kl = t * t * ((log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1))[keep].sum() / n
    return {"cls": cls, "kl": kl}


def _problem(k=500, dim=12, batch=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    centroids = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    student = torch.randn(batch, dim, generator=g)
    teacher = torch.randn(batch, dim, generator=g)
    labels = torch.randint(0, k, (batch,), generator=g)
    labels[:3] = -1  # rows without a cluster are ignored
    return centroids, student, teacher, labels


def test_sampled_losses_and_gradient_rows_equal_the_first_implementation():
    centroids, student, teacher, labels = _problem()
    pfc = PartialFC(centroids, 500, 12, scale=16.0, margin=0.3, sample_rate=0.1, kl_temperature=2.0, seed=4)
    s_new = student.clone().requires_grad_(True)
    got = pfc(s_new, teacher, labels)
    (got["cls"] + got["kl"]).backward()
    assert len(pfc.index) == 50 and set(labels[labels >= 0].tolist()) <= set(pfc.index.tolist())

    dense = centroids.clone().requires_grad_(True)
    s_old = student.clone().requires_grad_(True)
    want = reference_losses(dense, s_old, teacher, labels, pfc.index, 16.0, 0.3, 2.0)
    (want["cls"] + want["kl"]).backward()
    torch.testing.assert_close(got["cls"], want["cls"])
    torch.testing.assert_close(got["kl"], want["kl"])
    torch.testing.assert_close(s_new.grad, s_old.grad)
    torch.testing.assert_close(pfc.grad(), dense.grad[pfc.index])  # the sampled rows' gradient
    unsampled = torch.ones(500, dtype=torch.bool)
    unsampled[pfc.index] = False
    assert (dense.grad[unsampled] == 0).all()  # ... the only non-zero rows there are
    torch.testing.assert_close(pfc.dense_grad(), dense.grad)


def test_with_every_class_sampled_the_classifier_steps_exactly_as_torch_adamw():
    centroids, student, teacher, labels = _problem(k=40)
    pfc = PartialFC(centroids, 40, 12, sample_rate=1.0, betas=(0.9, 0.98), eps=1e-6)
    reference = torch.nn.Parameter(centroids.clone())
    adamw = torch.optim.AdamW([reference], lr=0.01, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    for step in range(4):
        terms = pfc(student + 0.1 * step, teacher, labels)
        (terms["cls"] + terms["kl"]).backward()
        reference.grad = pfc.grad().clone()  # the same gradient into both optimizers
        pfc.step(0.01)
        adamw.step()
        assert torch.equal(pfc.weight, reference.data)  # bit for bit
        assert torch.equal(pfc.exp_avg_sq, adamw.state[reference]["exp_avg_sq"])


def test_rows_not_sampled_keep_their_weights_and_moments():
    centroids, student, teacher, labels = _problem()
    pfc = PartialFC(centroids, 500, 12, sample_rate=0.1, seed=1)
    for _ in range(3):
        before = (pfc.weight.clone(), pfc.exp_avg.clone(), pfc.exp_avg_sq.clone())
        terms = pfc(student, teacher, labels)
        (terms["cls"] + terms["kl"]).backward()
        index = pfc.index
        pfc.step(0.05)
        rest = torch.ones(500, dtype=torch.bool)
        rest[index] = False
        for now, then in zip((pfc.weight, pfc.exp_avg, pfc.exp_avg_sq), before, strict=True):
            assert torch.equal(now[rest], then[rest])  # waiting rows do not drift
        assert not torch.equal(pfc.weight[index], before[0][index])
    assert pfc.steps == 3


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.bool_indexing = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        self.names.append(name)
        if name in ("index", "index_put", "index_put_"):
            indices = args[1] if len(args) > 1 else []
            self.bool_indexing += any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        return func(*args, **(kwargs or {}))


def test_the_step_reads_nothing_back_from_the_device():
    # On a GPU each of these ops waits for the device (its result's size or value goes to the host).
    centroids, student, teacher, labels = _problem()
    pfc = PartialFC(centroids, 500, 12, margin=0.2, sample_rate=0.1)
    student = student.requires_grad_(True)
    with _RecordOps() as ops:
        terms = pfc(student, teacher, labels)
        (terms["cls"] + terms["kl"]).backward()
        pfc.step(0.01)
    waiting = {"nonzero", "unique", "_unique2", "unique_dim", "masked_select", "_local_scalar_dense", "item"}
    assert not waiting & set(ops.names), sorted(waiting & set(ops.names))
    assert ops.bool_indexing == 0
    assert math.isfinite(terms["cls"].item())
