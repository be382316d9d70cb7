"""The distillation objective, in one place: the student's heads, the cluster classifier, the losses,
their weights and the names of the terms.

    L = w_clip * L_clip + w_cls * L_cls + w_kl * L_kl + w_ins * L_ins (+ w_simkd * L_simkd + w_fd * L_fd)

- L_clip: the student's own CLIP loss (open_clip's ClipLoss).
- L_cls, L_kl (CLIP-CID §3.2, losses/partial_fc.py): the student image embedding, through a head to the
  teacher's width, against a PartialFC classifier over the teacher's k-means clusters (initialised at
  the centroids): cross-entropy on the cluster label, and KL to the teacher embedding's distribution
  over the same sampled classes.
- L_ins (§3.3, losses/instance.py): student image <-> teacher text and student text <-> teacher image,
  contrastive, through heads of their own.
- Baselines (losses/baselines.py): similarity-matrix distillation and CLIP-KD feature distillation.
A term whose weight is 0 is not computed at all (and its heads never run).
"""

from __future__ import annotations

import open_clip
import torch
from torch import nn

from clipcid.errors import ClipcidError
from clipcid.losses.baselines import feature_distillation, similarity_distillation
from clipcid.losses.instance import InstanceDistillLoss
from clipcid.losses.partial_fc import PartialFC
from clipcid.stage import DistEnv

# Every term of L: its name (in logs, tensorboard, the report) -> the DistillConfig field of its weight.
TERMS = {"clip": "w_clip", "cls": "w_cls", "kl": "w_kl", "ins": "w_ins", "simkd": "w_simkd", "fd": "w_fd"}
TEACHER_TERMS = ("cls", "kl", "ins", "simkd", "fd")  # the ones that need the teacher's embeddings


def make_head(kind: str, dim_in: int, dim_out: int) -> nn.Module:
    if kind == "linear":
        return nn.Identity() if dim_in == dim_out else nn.Linear(dim_in, dim_out, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim_in, dim_in * 2), nn.GELU(), nn.Linear(dim_in * 2, dim_out))
    raise ClipcidError(f"--head must be linear or mlp, not {kind}")


class Student(nn.Module):
    """The student CLIP with its distillation heads and the instance loss's temperature, so that DDP
    wraps everything that is replicated."""

    def __init__(self, clip: nn.Module, student_dim: int, teacher_dim: int, head: str, local_loss: bool = False):
        super().__init__()
        self.clip = clip
        self.cls_head = make_head(head, student_dim, teacher_dim)
        self.ins_img_head = make_head(head, student_dim, teacher_dim)
        self.ins_txt_head = make_head(head, student_dim, teacher_dim)
        self.instance = InstanceDistillLoss(local_loss=local_loss)

    def forward(self, images, tokens, teacher_img=None, teacher_txt=None, need_cls=True, need_proj=True):
        # The instance loss runs inside forward: its temperature is a DDP parameter and must be used
        # in the graph DDP sees. Heads of switched-off terms are not run at all, so that DDP never
        # waits for a gradient that cannot come.
        img, txt, logit_scale = self.clip(images, tokens)[:3]
        out = {"img": img, "txt": txt, "logit_scale": logit_scale}
        if need_cls:
            out["cls_img"] = self.cls_head(img)
        if need_proj:
            out["ins_img"], out["ins_txt"] = self.ins_img_head(img), self.ins_txt_head(txt)
        if teacher_img is not None:
            out["ins"] = self.instance(out["ins_img"], out["ins_txt"], teacher_img, teacher_txt)
        return out


class Objective:
    """Builds what the terms need (heads, classifier, losses) and computes the named terms of a batch."""

    def __init__(self, cfg, clip: nn.Module, student_dim: int, teacher_dim: int, train, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.weights = {name: float(getattr(cfg, field)) for name, field in TERMS.items()}
        # The heads draw their initialisation from a generator seeded here, whatever ran before (a
        # model load, a data check): the same seed gives the same heads.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.student = Student(clip, student_dim, teacher_dim, cfg.head, cfg.local_loss).to(env.device)
        self.pfc: PartialFC | None = None
        if self.weights["cls"] or self.weights["kl"]:
            if train.centroids is None:
                raise ClipcidError("--w-cls / --w-kl need --clusters (or set both to 0)")
            rate = (
                cfg.pfc_sample_rate
                if cfg.pfc_sample_rate is not None
                else (0.1 if train.num_classes > 100_000 else 1.0)
            )
            self.pfc = PartialFC(
                train.centroids if cfg.fc_init == "centroids" else None,
                train.num_classes,
                teacher_dim,
                cfg.cls_scale,
                cfg.margin,
                rate,
                cfg.kl_temperature,
                cfg.seed,
            ).to(env.device)
        self.clip_loss = open_clip.ClipLoss(
            local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, rank=env.rank, world_size=env.world_size
        )

    def terms(self, model: nn.Module, batch: dict, images: torch.Tensor, tokens: torch.Tensor, autocast):
        """The named terms of one (micro-)batch; `model` is the student, or its DDP wrapper."""
        w, dev = self.weights, self.env.device
        t_img = batch["teacher_img"].to(dev, non_blocking=True)
        t_txt = batch["teacher_txt"].to(dev, non_blocking=True)
        with autocast:
            f = model(
                images,
                tokens,
                *((t_img, t_txt) if w["ins"] else (None, None)),
                need_cls=self.pfc is not None,
                need_proj=bool(w["ins"] or w["fd"]),
            )
        img, txt, logit_scale = f["img"].float(), f["txt"].float(), f["logit_scale"].float()
        out: dict[str, torch.Tensor] = {}
        if w["clip"]:
            out["clip"] = self.clip_loss(img, txt, logit_scale)
        if self.pfc is not None:
            out.update(self.pfc(f["cls_img"], t_img, batch["labels"].to(dev, non_blocking=True)))
        if w["ins"]:
            out["ins"] = f["ins"]
        if w["simkd"]:
            out["simkd"] = similarity_distillation(img, txt, logit_scale, t_img, t_txt, self.cfg.teacher_logit_scale)
        if w["fd"]:
            out["fd"] = feature_distillation(f["ins_img"], f["ins_txt"], t_img, t_txt)
        return out

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name] * value for name, value in terms.items())
