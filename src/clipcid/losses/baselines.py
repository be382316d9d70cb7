"""Two distillation baselines to compare CID against, both with the teacher offline.

- Similarity-matrix distillation (open_clip's DistillClipLoss, without a live teacher): soft
  cross-entropy between the teacher's and the student's image-text logit matrices, both ways.
- Feature distillation (CLIP-KD's FD): mean squared error between the student's projected and the
  teacher's normalised embeddings, image and text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipcid.losses.collectives import gather_no_grad, gather_with_grad


def _soft_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean()


def similarity_distillation(img_s, txt_s, logit_scale_s, img_t, txt_t, logit_scale_t: float = 100.0):
    """img_s/txt_s: the student's own (normalised) CLIP embeddings; img_t/txt_t: the teacher's."""
    img_s, txt_s = gather_with_grad(img_s), gather_with_grad(txt_s)
    img_t = gather_no_grad(F.normalize(img_t.float(), dim=1))
    txt_t = gather_no_grad(F.normalize(txt_t.float(), dim=1))
    student = logit_scale_s * img_s @ txt_s.T
    teacher = logit_scale_t * img_t @ txt_t.T
    return 0.5 * (_soft_cross_entropy(teacher, student) + _soft_cross_entropy(teacher.T, student.T))


def feature_distillation(img_s_proj, txt_s_proj, img_t, txt_t):
    img_t, txt_t = F.normalize(img_t.float(), dim=1), F.normalize(txt_t.float(), dim=1)
    return 0.5 * (
        F.mse_loss(F.normalize(img_s_proj.float(), dim=1), img_t)
        + F.mse_loss(F.normalize(txt_s_proj.float(), dim=1), txt_t)
    )
