"""`clipcid distill`: train a student CLIP with the CLIP loss plus cluster-level and instance-level
distillation from offline teacher embeddings (CLIP-CID), or with a baseline distillation loss.

L = w_clip * L_clip + w_cls * L_cls + w_kl * L_kl + w_ins * L_ins (+ w_simkd * L_simkd + w_fd * L_fd);
every term is logged alone. The teacher never runs: its embeddings and cluster labels are read by
(shard, row). The student is wrapped in DDP under torchrun; the PartialFC classifier is sharded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from torch import nn

from clipcid.distill.data import TrainBatches, batches_per_worker, epoch_assignment, load_train_rows
from clipcid.errors import ClipcidError
from clipcid.losses.baselines import feature_distillation, similarity_distillation
from clipcid.losses.instance import InstanceDistillLoss
from clipcid.losses.partial_fc import PartialFC
from clipcid.models import embedding_dim, lock_text_tower, padding_trimmer, register_model_configs
from clipcid.stage import DistEnv, barrier, init_distributed, shutdown
from clipcid.util import precision
from clipcid.util.fileio import atomic_path, save_json_atomic
from clipcid.util.progress import progress_bar
from clipcid.util.schedule import cosine_with_warmup

log = logging.getLogger("clipcid")


@dataclass
class DistillConfig:
    data: str
    out: str
    model: str
    teacher_emb: str | None = None  # without it only the CLIP loss can train (a teacher, or a baseline)
    balance: str | None = None
    clusters: str | None = None
    pretrained: str | None = None
    batch_size: int = 64
    epochs: int = 1
    train_num_samples: int | None = None
    dataset_resampled: bool = False
    lr: float = 5e-4
    wd: float = 0.2
    warmup: int = 100
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    precision: str = "fp32"
    grad_checkpointing: bool = False
    lock_text: bool = False  # LiT: train with the text tower frozen (a pretrained HF tower keeps its projection)
    accum_freq: int = 1
    grad_clip_norm: float | None = None
    local_loss: bool = False
    gather_with_grad: bool = True
    workers: int = 2
    seed: int = 0
    resume: str | None = None
    save_every_n_steps: int | None = None
    log_every_n_steps: int = 10
    w_clip: float = 1.0
    w_cls: float = 1.0
    w_kl: float = 0.5
    w_ins: float = 1.0
    w_simkd: float = 0.0
    w_fd: float = 0.0
    cls_scale: float = 32.0
    margin: float = 0.0
    kl_temperature: float = 1.0
    pfc_sample_rate: float | None = None
    pfc_lr_scale: float = 1.0
    fc_init: str = "centroids"
    head: str = "linear"
    teacher_logit_scale: float = 100.0
    eval_every: int | None = None
    eval_suite_root: str | None = None
    device: str = "auto"
    max_steps: int | None = None  # stop early (tests, smoke runs); the schedule still spans all steps


def make_head(kind: str, dim_in: int, dim_out: int) -> nn.Module:
    if kind == "linear":
        return nn.Identity() if dim_in == dim_out else nn.Linear(dim_in, dim_out, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim_in, dim_in * 2), nn.GELU(), nn.Linear(dim_in * 2, dim_out))
    raise ClipcidError(f"--head must be linear or mlp, not {kind}")


class Student(nn.Module):
    """The student CLIP with its distillation heads and the instance loss's temperature, so that DDP
    wraps everything that is replicated."""

    def __init__(self, clip: nn.Module, student_dim: int, teacher_dim: int, head: str):
        super().__init__()
        self.clip = clip
        self.cls_head = make_head(head, student_dim, teacher_dim)
        self.ins_img_head = make_head(head, student_dim, teacher_dim)
        self.ins_txt_head = make_head(head, student_dim, teacher_dim)
        self.instance = InstanceDistillLoss()

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


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(cfg: DistillConfig, student: nn.Module, pfc: PartialFC | None) -> torch.optim.Optimizer:
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": cfg.wd, "lr_scale": 1.0},
        {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    if pfc is not None:
        # Cosine logits ignore the classifier's norm, so weight decay would only shrink it and speed it up.
        groups.append({"params": [pfc.weight], "weight_decay": 0.0, "lr_scale": cfg.pfc_lr_scale})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_at(step: int, cfg: DistillConfig, total_steps: int) -> float:
    return cosine_with_warmup(step, cfg.lr, cfg.warmup, total_steps)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, cfg: DistillConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.out)
        self.validate()
        register_model_configs()
        self.train = load_train_rows(cfg.data, cfg.teacher_emb, cfg.balance, cfg.clusters)
        torch.manual_seed(cfg.seed)
        clip, preprocess_train, self.preprocess_val = open_clip.create_model_and_transforms(
            cfg.model, pretrained=cfg.pretrained
        )
        if cfg.grad_checkpointing:
            clip.set_grad_checkpointing(True)
        if cfg.lock_text:
            lock_text_tower(clip)
        self.trim = padding_trimmer(clip)
        self.preprocess = preprocess_train
        self.tokenizer = open_clip.get_tokenizer(cfg.model)
        student_dim = embedding_dim(clip)
        teacher_dim = self.train.store_img.dim if self.train.store_img is not None else student_dim
        self.student = Student(clip, student_dim, teacher_dim, cfg.head).to(env.device)
        self.pfc = None
        if cfg.w_cls or cfg.w_kl:
            if not cfg.clusters:
                raise ClipcidError("--w-cls / --w-kl need --clusters (or set both to 0)")
            centroids = torch.from_numpy(self.train.centroids)
            rate = (
                cfg.pfc_sample_rate
                if cfg.pfc_sample_rate is not None
                else (0.1 if self.train.num_classes > 100_000 else 1.0)
            )
            self.pfc = PartialFC(
                centroids if cfg.fc_init == "centroids" else None,
                self.train.num_classes,
                teacher_dim,
                cfg.cls_scale,
                cfg.margin,
                rate,
                cfg.kl_temperature,
                cfg.seed,
            ).to(env.device)
        self.ddp = self.student
        if env.world_size > 1:
            # Heads of switched-off terms get no gradient: let DDP look for unused parameters.
            self.ddp = nn.parallel.DistributedDataParallel(
                self.student,
                device_ids=[env.device.index] if env.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        self.clip_loss = open_clip.ClipLoss(
            local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, rank=env.rank, world_size=env.world_size
        )
        self.optimizer = build_optimizer(cfg, self.student, self.pfc)
        self.scaler = torch.amp.GradScaler(enabled=precision.needs_grad_scaler(cfg.precision, env.device))
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.writer = None

    def validate(self) -> None:
        cfg = self.cfg
        cfg.precision = precision.canonical(cfg.precision)
        if cfg.fc_init not in ("centroids", "random"):
            raise ClipcidError("--fc-init must be centroids or random")
        if cfg.accum_freq < 1 or cfg.batch_size < 1 or cfg.epochs < 1:
            raise ClipcidError("--batch-size, --epochs and --accum-freq must be at least 1")
        distilling = [w for w in ("w_cls", "w_kl", "w_ins", "w_simkd", "w_fd") if getattr(cfg, w)]
        if distilling and not cfg.teacher_emb:
            raise ClipcidError(
                f"{', '.join('--' + w.replace('_', '-') for w in distilling)} need --teacher-emb "
                "(or set them to 0 to train with the CLIP loss alone)"
            )
        if cfg.eval_every and not cfg.eval_suite_root:
            raise ClipcidError("--eval-every needs --eval-suite-root (the folder `clipcid data build-eval` wrote)")

    def _steps_per_epoch(self) -> int:
        """Every rank must take the same number of steps: the smallest rank's count, over all epochs'
        assignments, bounded by --train-num-samples."""
        counts = []
        for epoch in range(self.cfg.epochs):
            for rank in range(self.env.world_size):
                assignment = epoch_assignment(
                    len(self.train.parts),
                    epoch,
                    self.cfg.seed,
                    rank,
                    self.env.world_size,
                    max(1, self.cfg.workers),
                    self.cfg.dataset_resampled,
                )
                batches = batches_per_worker(self.train, assignment, self.cfg.batch_size)
                counts.append(sum(batches) // self.cfg.accum_freq)
        steps = min(counts)
        if self.cfg.train_num_samples:
            per_step = self.cfg.batch_size * self.cfg.accum_freq * self.env.world_size
            steps = min(steps, self.cfg.train_num_samples // per_step)
        if steps == 0:
            raise ClipcidError(
                f"{self.train.total} usable rows give no full batch of {self.cfg.batch_size} per "
                f"rank and worker; lower --batch-size or --workers"
            )
        return steps

    # -- checkpoints -------------------------------------------------------------------------------

    def _checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> None:
        """All ranks write into a temporary folder; rank 0 renames it and points `latest` at it."""
        folder = self._checkpoint_dir() / f"step_{self.step:08d}"
        tmp = folder.with_name(folder.name + ".partial")
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.env)
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "pfc": None
            if self.pfc is None
            else {"weight": self.pfc.weight.detach().cpu(), "generator": self.pfc.generator.get_state()},
        }
        torch.save(state, tmp / f"rank{self.env.rank}.pt")
        if self.env.is_main:
            torch.save({"student": self.student.state_dict(), "config": asdict(self.cfg)}, tmp / "model.pt")
        barrier(self.env)
        if self.env.is_main:
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
            with atomic_path(self._checkpoint_dir() / "latest.txt") as f:
                f.write_text(folder.name + "\n")
        barrier(self.env)

    def load_checkpoint(self, which: str) -> None:
        if which == "latest":
            pointer = self._checkpoint_dir() / "latest.txt"
            if not pointer.is_file():
                log.info("--resume latest: no checkpoint in %s, starting fresh", self._checkpoint_dir())
                return
            folder = self._checkpoint_dir() / pointer.read_text().strip()
        else:
            folder = Path(which)
        if not (folder / "model.pt").is_file():
            raise ClipcidError(f"no checkpoint at {folder}")
        model = torch.load(folder / "model.pt", map_location=self.env.device, weights_only=False)
        self.student.load_state_dict(model["student"])
        state_file = folder / f"rank{self.env.rank}.pt"
        if not state_file.is_file():
            raise ClipcidError(f"{folder} was saved by fewer ranks: resume with the same number of processes")
        state = torch.load(state_file, map_location=self.env.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        if self.pfc is not None and state["pfc"] is not None:
            self.pfc.weight.data.copy_(state["pfc"]["weight"])
            self.pfc.generator.set_state(state["pfc"]["generator"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        if self.env.is_main:
            self._truncate_log(self.step)
        log.info(
            "resumed from %s at step %d (epoch %d, step %d of it)", folder, self.step, self.epoch, self.step_in_epoch
        )

    def _truncate_log(self, step: int) -> None:
        """Drop log rows of steps after the checkpoint: they are trained again, and logged again."""
        for name in ("train_log.jsonl", "results.jsonl"):
            path = self.out / name
            if path.is_file():
                rows = [line for line in path.read_text().splitlines() if line.strip()]
                kept = [line for line in rows if json.loads(line)["step"] <= step]
                if len(kept) != len(rows):
                    with atomic_path(path) as tmp:
                        tmp.write_text("".join(line + "\n" for line in kept))

    # -- training ----------------------------------------------------------------------------------

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        cfg, dev = self.cfg, self.env.device
        autocast = precision.autocast(dev, cfg.precision)
        t_img, t_txt = batch["teacher_img"].to(dev), batch["teacher_txt"].to(dev)
        with autocast:
            f = self.ddp(
                batch["images"].to(dev),
                self.trim(batch["tokens"]).to(dev),
                *((t_img, t_txt) if cfg.w_ins else (None, None)),
                need_cls=self.pfc is not None,
                need_proj=bool(cfg.w_ins or cfg.w_fd),
            )
        img, txt, logit_scale = f["img"], f["txt"], f["logit_scale"]
        out: dict[str, torch.Tensor] = {}
        if cfg.w_clip:
            out["clip"] = self.clip_loss(img.float(), txt.float(), logit_scale.float())
        if self.pfc is not None:
            out.update(self.pfc(f["cls_img"], t_img, batch["labels"].to(dev)))
        if cfg.w_ins:
            out["ins"] = f["ins"]
        if cfg.w_simkd:
            out["simkd"] = similarity_distillation(
                img.float(), txt.float(), logit_scale.float(), t_img, t_txt, cfg.teacher_logit_scale
            )
        if cfg.w_fd:
            out["fd"] = feature_distillation(f["ins_img"], f["ins_txt"], t_img, t_txt)
        return out

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = {
            "clip": self.cfg.w_clip,
            "cls": self.cfg.w_cls,
            "kl": self.cfg.w_kl,
            "ins": self.cfg.w_ins,
            "simkd": self.cfg.w_simkd,
            "fd": self.cfg.w_fd,
        }
        return sum(weights[name] * value for name, value in terms.items())

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        lr = lr_at(self.step, self.cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        self.optimizer.zero_grad(set_to_none=True)
        logged: dict[str, float] = {}
        for batch in micro_batches:
            terms = self.losses(batch)
            loss = self.total(terms) / len(micro_batches)
            bad = [name for name, value in terms.items() if not torch.isfinite(value)]
            if bad or not torch.isfinite(loss):
                raise ClipcidError(
                    f"step {self.step}: loss is not finite ({', '.join(bad) or 'total'}); nothing "
                    "was saved from this step. Lower --lr, use fp32, or resume from the last "
                    "checkpoint"
                )
            self.scaler.scale(loss).backward()
            for name, value in terms.items():
                logged[name] = logged.get(name, 0.0) + value.item() / len(micro_batches)
            logged["total"] = logged.get("total", 0.0) + loss.item()
        if self.pfc is not None:
            self.pfc.finish_backward()
        if self.cfg.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():  # as open_clip: keep the temperature below 100
            self.student.clip.logit_scale.clamp_(0, math.log(100))
        logged["lr"] = lr
        return logged

    def run(self) -> dict:
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_json_atomic(
                self.out / "params.json",
                {
                    **asdict(cfg),
                    "world_size": env.world_size,
                    "steps_per_epoch": self.steps_per_epoch,
                    "total_steps": self.total_steps,
                    "train_rows": self.train.total,
                },
            )
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        if cfg.resume:
            self.load_checkpoint(cfg.resume)
        last_logged: dict[str, float] = {}
        stop_at = min(self.total_steps, cfg.max_steps or self.total_steps)
        window_start, window_samples = time.monotonic(), 0
        with progress_bar(stop_at, "distill", "step", env.is_main) as bar:
            bar.update(self.step)
            while self.step < stop_at:
                loader = self._loader()
                micro: list[dict] = []
                for batch in loader:
                    micro.append(batch)
                    if len(micro) < cfg.accum_freq:
                        continue
                    logged = self.train_step(micro)
                    micro = []
                    self.step += 1
                    self.step_in_epoch += 1
                    window_samples += cfg.batch_size * cfg.accum_freq * env.world_size
                    bar.update(1)
                    last_logged = logged
                    self._log(logged, window_start, window_samples)
                    if self.step % cfg.log_every_n_steps == 0:
                        window_start, window_samples = time.monotonic(), 0
                    if cfg.save_every_n_steps and self.step % cfg.save_every_n_steps == 0:
                        self.save_checkpoint()
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        self.evaluate()
                    if self.step >= stop_at or self.step_in_epoch >= self.steps_per_epoch:
                        break
                if self.step_in_epoch >= self.steps_per_epoch:
                    self.epoch += 1
                    self.step_in_epoch = 0
                    self.save_checkpoint()
        self.save_final()
        if self.writer:
            self.writer.close()
        return {"steps": self.step, "last": last_logged}

    def _loader(self):
        cfg, env = self.cfg, self.env
        dataset = TrainBatches(
            self.train,
            self.preprocess,
            self.tokenizer,
            cfg.batch_size,
            self.epoch,
            cfg.seed,
            env.rank,
            env.world_size,
            max(1, cfg.workers),
            self.steps_per_epoch * cfg.accum_freq,
            self.step_in_epoch * cfg.accum_freq,
            cfg.dataset_resampled,
        )
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=cfg.workers, pin_memory=env.device.type == "cuda"
        )

    def _log(self, logged: dict[str, float], window_start: float, window_samples: int) -> None:
        if not self.env.is_main:
            return
        for name, value in logged.items():
            self.writer.add_scalar(f"train/{name}", value, self.step)
        if self.step % self.cfg.log_every_n_steps == 0 or self.step == 1:
            rate = window_samples / max(time.monotonic() - window_start, 1e-9)
            terms = " ".join(f"{k} {v:.4f}" for k, v in logged.items() if k not in ("lr", "total"))
            log.info(
                "step %d/%d epoch %d: loss %.4f (%s) lr %.2e, %.1f samples/s",
                self.step,
                self.total_steps,
                self.epoch,
                logged["total"],
                terms,
                logged["lr"],
                rate,
            )
            with open(self.out / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "epoch": self.epoch, **logged, "samples_per_s": rate}) + "\n")

    def evaluate(self) -> None:
        from clipcid.evaluation.features import OpenClipEncoder
        from clipcid.evaluation.run import run_eval_suite

        if not self.env.is_main:
            barrier(self.env)
            return
        clip = self.student.clip
        clip.eval()
        encoder = OpenClipEncoder(
            clip, self.preprocess_val, self.tokenizer, self.env.device, "fp32", f"step{self.step}"
        )
        result = run_eval_suite(self.cfg.model, None, None, self.cfg.eval_suite_root, encoder=encoder, workers=0)
        clip.train()
        for name, value in result["summary"].items():
            if value is not None:
                self.writer.add_scalar(f"eval/{name}", value, self.step)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **result["summary"]}) + "\n")
        log.info("eval at step %d: %s", self.step, result["summary"])
        barrier(self.env)

    def save_final(self) -> None:
        """The student alone, loadable by open_clip.create_model_and_transforms(ARCH, pretrained=PATH);
        heads and classifier apart."""
        if self.env.is_main:
            with atomic_path(self.out / "student.pt") as tmp:
                torch.save({"state_dict": self.student.clip.state_dict()}, tmp)
            heads = {k: v for k, v in self.student.state_dict().items() if not k.startswith("clip.")}
            with atomic_path(self.out / "distill_heads.pt") as tmp:
                torch.save({"heads": heads, "config": asdict(self.cfg)}, tmp)
        if self.pfc is not None:
            with atomic_path(self.out / f"classifier_rank{self.env.rank}.pt") as tmp:
                torch.save({"weight": self.pfc.weight.detach().cpu(), "shard": (self.pfc.start, self.pfc.end)}, tmp)
        barrier(self.env)


def distill(cfg: DistillConfig) -> dict:
    env = init_distributed(cfg.device)
    try:
        if env.world_size > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // env.world_size))
        return Trainer(cfg, env).run()
    finally:
        shutdown(env)
