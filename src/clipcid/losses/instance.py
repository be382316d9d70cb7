"""Instance-level distillation (CLIP-CID §3.3): teacher image <-> student text and teacher text <->
student image, contrastive over the batch with a learnable temperature, like CLIP-KD's interactive
contrastive loss:

    L_ins = 1/2 [ CE(tau * img_S @ txt_T^T, diag) + CE(tau * txt_S @ img_T^T, diag) ]

Student embeddings arrive already projected to the teacher's dimension by their heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipcid.losses.collectives import gather_no_grad, gather_with_grad, world


class InstanceDistillLoss(nn.Module):
    def __init__(self, init_temperature: float = 0.07, local_loss: bool = False):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.local_loss = local_loss

    def forward(self, img_s, txt_s, img_t, txt_t) -> torch.Tensor:
        img_s, txt_s = F.normalize(img_s.float(), dim=1), F.normalize(txt_s.float(), dim=1)
        img_t, txt_t = F.normalize(img_t.float(), dim=1), F.normalize(txt_t.float(), dim=1)
        rank, _ = world()
        all_img_t, all_txt_t = gather_no_grad(img_t), gather_no_grad(txt_t)
        if self.local_loss:  # local rows against global columns; DDP averages the per-rank losses
            rows_img, rows_txt = img_s, txt_s
            labels = torch.arange(len(img_s), device=img_s.device) + rank * len(img_s)
        else:  # the global batch on every rank (open_clip's default with gather_with_grad)
            rows_img, rows_txt = gather_with_grad(img_s), gather_with_grad(txt_s)
            labels = torch.arange(len(rows_img), device=img_s.device)
        scale = self.logit_scale.exp().clamp(max=100)
        return 0.5 * (
            F.cross_entropy(scale * rows_img @ all_txt_t.T, labels)
            + F.cross_entropy(scale * rows_txt @ all_img_t.T, labels)
        )
