from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, run_two_gloo_processes
from dist_losses_worker import fixed_problem, run

from clipcid.losses.baselines import feature_distillation, similarity_distillation
from clipcid.losses.instance import InstanceDistillLoss
from clipcid.losses.partial_fc import PartialFC, shard_range


def test_sample_rate_one_equals_full_softmax_cross_entropy():
    p = fixed_problem(batch=12, classes=7)
    pfc = PartialFC(p["centroids"], 7, 16, scale=20.0, sample_rate=1.0)
    got = pfc(p["student"], p["teacher"], p["labels"])["cls"]
    logits = 20.0 * F.normalize(p["student"], dim=1) @ p["centroids"].T
    torch.testing.assert_close(got, F.cross_entropy(logits, p["labels"]))


def test_sampled_classes_hold_every_positive():
    torch.manual_seed(0)
    centroids = F.normalize(torch.randn(1000, 8), dim=1)
    pfc = PartialFC(centroids, 1000, 8, sample_rate=0.1, seed=3)
    for _ in range(5):
        labels = torch.randint(0, 1000, (64,))
        index, target = pfc.sample(labels)
        assert len(index) == 100 and set(labels.tolist()) <= set(index.tolist())
        assert (index[target] == labels).all()  # remapped labels point back at the right class
    many = torch.arange(0, 1000, 5)  # 200 positives: more than the 10% budget, all kept
    index, _ = pfc.sample(many)
    assert len(index) == 200 and set(many.tolist()) == set(index.tolist())


def test_kl_is_zero_when_student_matches_teacher_and_positive_otherwise():
    p = fixed_problem()
    pfc = PartialFC(p["centroids"], 10, 16, sample_rate=1.0, kl_temperature=2.0)
    assert pfc(p["teacher"], p["teacher"], p["labels"])["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert pfc(p["student"], p["teacher"], p["labels"])["kl"].item() > 0.01


def test_kl_matches_a_direct_computation():
    p = fixed_problem()
    t, s = 2.0, 16.0
    pfc = PartialFC(p["centroids"], 10, 16, scale=s, sample_rate=1.0, kl_temperature=t)
    zs = s * F.normalize(p["student"], dim=1) @ p["centroids"].T
    zt = s * F.normalize(p["teacher"], dim=1) @ p["centroids"].T
    want = (
        t
        * t
        * F.kl_div(F.log_softmax(zs / t, dim=1), F.log_softmax(zt / t, dim=1), log_target=True, reduction="batchmean")
    )
    torch.testing.assert_close(pfc(p["student"], p["teacher"], p["labels"])["kl"], want)


def test_classifier_starts_at_the_centroids_and_margin_raises_the_loss():
    p = fixed_problem()
    plain = PartialFC(p["centroids"], 10, 16, margin=0.0)
    torch.testing.assert_close(plain.weight.data, p["centroids"])
    arc = PartialFC(p["centroids"], 10, 16, margin=0.3)
    assert arc(p["student"], p["teacher"], p["labels"])["cls"] > plain(p["student"], p["teacher"], p["labels"])["cls"]
    assert shard_range(10, 0, 3) == (0, 4) and shard_range(10, 2, 3) == (7, 10)


def test_ignored_rows_do_not_count():
    p = fixed_problem()
    pfc = PartialFC(p["centroids"], 10, 16)
    labels = p["labels"].clone()
    labels[:3] = -1
    both = pfc(p["student"], p["teacher"], labels)
    rest = pfc(p["student"][3:], p["teacher"][3:], p["labels"][3:])
    torch.testing.assert_close(both["cls"], rest["cls"])
    torch.testing.assert_close(both["kl"], rest["kl"])


def test_instance_loss_equals_a_hand_computation_on_three_samples():
    img_s = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    txt_s = np.array([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    img_t = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt_t = np.array([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    tau = 1 / 0.07

    def ce_diag(logits):
        logits = logits - logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(logp))

    want = 0.5 * (ce_diag(tau * img_s @ txt_t.T) + ce_diag(tau * txt_s @ img_t.T))
    loss = InstanceDistillLoss(0.07)
    got = loss(*(torch.tensor(a, dtype=torch.float32) for a in (img_s, txt_s, img_t, txt_t)))
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert loss.logit_scale.item() == pytest.approx(math.log(tau))


def test_baselines():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(6, 8), dim=1)
    # The student that reproduces the teacher's logits exactly has the teacher's entropy as its loss.
    same = similarity_distillation(img, txt, 100.0, img, txt, 100.0)
    other = similarity_distillation(F.normalize(torch.randn(6, 8), dim=1), txt, 100.0, img, txt, 100.0)
    assert other > same
    assert feature_distillation(img, txt, img, txt).item() == pytest.approx(0.0, abs=1e-7)
    assert feature_distillation(-img, txt, img, txt).item() == pytest.approx(0.5 * 4 / 8, rel=1e-5)


def test_two_gloo_ranks_give_the_losses_and_gradients_of_one(tmp_path):
    problem = fixed_problem()
    single = run(problem, slice(0, 8))
    run_two_gloo_processes([str(REPO_ROOT / "tests" / "dist_losses_worker.py"), str(tmp_path)])
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        for name, value in single["losses"].items():
            assert r["losses"][name] == pytest.approx(value, rel=1e-5)
    # Each rank's input gradients are world_size x the single-process ones (DDP's average undoes it).
    torch.testing.assert_close(torch.cat([r["grad_student"] for r in ranks]) / 2, single["grad_student"])
    torch.testing.assert_close(torch.cat([r["grad_txt"] for r in ranks]) / 2, single["grad_txt"])
    # The classifier is sharded by rows; its gradient is exact on each shard.
    assert [r["shard"] for r in ranks] == [(0, 5), (5, 10)]
    torch.testing.assert_close(torch.cat([r["grad_weight"] for r in ranks]), single["grad_weight"])
    # The temperature is replicated and sees the whole global loss on each rank: exact on each.
    for r in ranks:
        torch.testing.assert_close(r["grad_scale"], single["grad_scale"])
