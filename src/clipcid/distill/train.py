"""`clipcid distill`: train a student CLIP with the CLIP loss plus cluster-level and instance-level
distillation from offline teacher embeddings (CLIP-CID), or with a baseline distillation loss.

The objective (terms, weights, heads, classifier) is distill/objective.py, the run folder and its
checkpoints distill/checkpoint.py, the data distill/data.py; this module is the loop. The teacher never
runs: its embeddings and cluster labels are read by (shard, row). Under torchrun the student is
wrapped in DDP and the PartialFC classifier is sharded.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from clipcid.config import option
from clipcid.config import validate as check_bounds
from clipcid.distill.checkpoint import EVAL_LOG, TRAIN_LOG, TrainingRun, student_path
from clipcid.distill.data import (
    TrainBatches,
    TrainRows,
    batches_per_worker,
    epoch_assignment,
    load_train_rows,
    split_preprocess,
)
from clipcid.distill.objective import TEACHER_TERMS, TERMS, Objective
from clipcid.errors import ClipcidError
from clipcid.models import embedding_dim, load_model, lock_text_tower, padding_trimmer
from clipcid.stage import DistEnv, barrier, distributed
from clipcid.util import precision
from clipcid.util.optim import adamw
from clipcid.util.progress import progress_bar
from clipcid.util.schedule import cosine_with_warmup

log = logging.getLogger("clipcid")

# Settings that do not change what is trained (where, how often it is saved, logged or evaluated).
RUNTIME_FIELDS = (
    "out",
    "resume",
    "save_every_n_steps",
    "keep_checkpoints",
    "log_every_n_steps",
    "eval_every",
    "eval_suite_root",
    "device",
    "max_steps",
    "overwrite",
)


@dataclass
class DistillConfig:
    data: str = option(help="training shards (the ones the teacher embeddings were made from)")
    out: str = option(help="run folder: checkpoints, params.json, tensorboard, student.pt")
    model: str = option(help="student architecture (open_clip name, or clipcid-tiny)")
    teacher_emb: str | None = option(None, "teacher embeddings folder; without it only the CLIP loss can train")
    balance: str | None = option(None, "balance folder: train only on the kept rows")
    clusters: str | None = option(None, "clusters folder: needed by the cluster-level terms")
    holdout: str | None = option(None, "hold-out folder (clipcid holdout): its rows are never trained on")
    pretrained: str | None = option(None, "start the student from this open_clip tag or checkpoint")
    batch_size: int = option(64, "pairs per step and process", at_least=1)
    epochs: int = option(1, "passes over the data", at_least=1)
    train_num_samples: int | None = option(None, "pairs per epoch, at most (all usable rows by default)", at_least=1)
    dataset_resampled: bool = option(False, "draw shards with replacement each epoch, as webdataset's resampled")
    lr: float = option(5e-4, "peak learning rate", above=0)
    wd: float = option(0.2, "AdamW weight decay (not on biases, norms, temperatures)", at_least=0)
    warmup: int | None = option(None, "warm-up steps (default: 5 % of the run's steps)", at_least=0)
    beta1: float = option(0.9, "AdamW beta1", at_least=0, below=1)
    beta2: float = option(0.98, "AdamW beta2", at_least=0, below=1)
    eps: float = option(1e-6, "AdamW epsilon", above=0)
    precision: str = option("fp32", "autocast precision", ("fp32", "bf16", "fp16", "amp_bf16", "amp"))
    grad_checkpointing: bool = option(False, "recompute activations in backward (less memory)")
    lock_text: bool = option(False, "LiT: freeze the text tower (a pretrained HF tower keeps its projection)")
    accum_freq: int = option(1, "micro-batches per optimizer step", at_least=1)
    grad_clip_norm: float | None = option(None, "clip the gradient norm to this", above=0)
    local_loss: bool = option(False, "contrastive losses: local rows against global columns")
    gather_with_grad: bool = option(True, "gather embeddings across processes with their gradients")
    workers: int = option(
        2, "data loading processes (they set the data order: resume with the same number)", at_least=0
    )
    seed: int = option(0, "seed of the student's init, the data order and the classifier's sampling")
    resume: str | None = option(None, "latest, or a checkpoint folder")
    save_every_n_steps: int | None = option(None, "checkpoint every N steps (and at every epoch's end)", at_least=1)
    keep_checkpoints: int = option(
        2, "newest checkpoints kept in RUN/checkpoints, older ones deleted (0: keep all)", at_least=0
    )
    log_every_n_steps: int = option(10, "log line and train_log.jsonl row every N steps", at_least=1)
    w_clip: float = option(1.0, "weight of the student's own CLIP loss (0 turns it off)", at_least=0)
    w_cls: float = option(1.0, "weight of cluster discrimination (cross-entropy on the pseudo-labels)", at_least=0)
    w_kl: float = option(0.5, "weight of KL to the teacher's cluster distribution", at_least=0)
    w_ins: float = option(1.0, "weight of instance-level teacher-student contrastive distillation", at_least=0)
    w_simkd: float = option(0.0, "baseline: similarity-matrix distillation (open_clip style)", at_least=0)
    w_fd: float = option(0.0, "baseline: feature distillation (CLIP-KD style MSE)", at_least=0)
    cls_scale: float = option(32.0, "cluster logits: scale s of s * cos", above=0)
    margin: float = option(0.0, "cluster logits: ArcFace margin on the target", at_least=0)
    kl_temperature: float = option(1.0, "temperature T of the KL term", above=0)
    pfc_sample_rate: float | None = option(
        None, "share of classes sampled per step (1.0, or 0.1 above 100k)", above=0, at_most=1
    )
    pfc_lr_scale: float = option(1.0, "learning-rate multiplier of the cluster classifier", at_least=0)
    fc_init: str = option("centroids", "classifier start: the k-means centroids, or random", ("centroids", "random"))
    head: str = option("linear", "heads from the student's width to the teacher's", ("linear", "mlp"))
    teacher_logit_scale: float = option(100.0, "similarity distillation: the teacher's logit scale", above=0)
    eval_every: int | None = option(None, "evaluate the held-out suite every N steps", at_least=1)
    eval_suite_root: str | None = option(None, "the suite for --eval-every")
    device: str = option("auto", "auto, cpu or cuda")
    max_steps: int | None = option(
        None, "stop after this many steps (the schedule still spans the whole run)", at_least=1
    )
    max_bad_fraction: float = option(
        0.01, "stop when more than this share of rows or shards cannot be trained on", at_least=0, at_most=1
    )
    overwrite: bool = option(False, "replace what --out holds if it was made with other settings")


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(cfg: DistillConfig, student: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the student and its heads; the cluster classifier steps itself (PartialFC.step: only
    the sampled rows, no weight decay: cosine logits ignore its rows' norms)."""
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": cfg.wd, "lr_scale": 1.0},
        {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    return adamw(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


WARMUP_SHARE = 0.05  # of the run's steps, when --warmup is not set
# Below this many steps a student is still in its first descent, and two students differ by where they
# started more than by how they were trained: a rule of thumb, not a measured bound (the demo's 1-epoch
# students take 188 steps, and their differences over seeds are the smallest the study resolves).
MIN_COMPARABLE_STEPS = 100


def warmup_steps(cfg: DistillConfig, total_steps: int) -> int:
    return cfg.warmup if cfg.warmup is not None else max(1, round(WARMUP_SHARE * total_steps))


def too_short(total_steps: int, warmup: int, steps_per_epoch: int, epochs: int) -> str | None:
    """Why a run is too short for its student to be compared with another, or None."""
    reasons = []
    if total_steps < warmup:
        reasons.append(f"fewer than its {warmup} warm-up steps")
    if total_steps < MIN_COMPARABLE_STEPS:
        reasons.append(f"fewer than the {MIN_COMPARABLE_STEPS} a comparison of students needs")
    if not reasons:
        return None
    wanted = math.ceil(max(MIN_COMPARABLE_STEPS, warmup) / max(steps_per_epoch, 1))
    return (
        f"{total_steps} steps ({epochs} epoch(s) of {steps_per_epoch}): {' and '.join(reasons)}; "
        f"--epochs {max(wanted, epochs + 1)} (or more data) would give {max(wanted, epochs + 1) * steps_per_epoch}"
    )


def validate(cfg: DistillConfig) -> None:
    check_bounds(cfg)
    cfg.precision = precision.canonical(cfg.precision)
    distilling = [TERMS[t] for t in TEACHER_TERMS if getattr(cfg, TERMS[t])]
    if distilling and not cfg.teacher_emb:
        raise ClipcidError(
            f"{', '.join('--' + w.replace('_', '-') for w in distilling)} need --teacher-emb "
            "(or set them to 0 to train with the CLIP loss alone)"
        )
    if cfg.eval_every and not cfg.eval_suite_root:
        raise ClipcidError("--eval-every needs --eval-suite-root (the folder `clipcid data build-eval` wrote)")


class StepValues:
    """A step's loss values on their way to the host: copied without waiting (pinned memory and an
    event on a GPU), read when the next step begins. One host synchronisation per step at most, and
    none inside it."""

    def __init__(self, device: torch.device):
        self.device, self.pending_step = device, None
        self._names: list[str] = []
        self._host: torch.Tensor | None = None
        self._event = None
        self._lr = 0.0
        self.epoch = 0

    def push(self, step: int, values: dict[str, torch.Tensor], lr: float, epoch: int) -> None:
        self._names = list(values)
        stacked = torch.stack([torch.as_tensor(v, device=self.device).float() for v in values.values()])
        if self.device.type == "cuda":
            self._host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            self._host.copy_(stacked, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = stacked
        self.pending_step, self._lr, self.epoch = step + 1, lr, epoch

    def pop(self) -> tuple[int, dict[str, float]] | None:
        if self.pending_step is None:
            return None
        if self._event is not None:
            self._event.synchronize()
        values = dict(zip(self._names, self._host.tolist(), strict=True))
        values["lr"] = self._lr
        step, self.pending_step = self.pending_step, None
        return step, values


class Trainer:
    def __init__(self, cfg: DistillConfig, env: DistEnv, train: TrainRows | None = None, total_steps: int = 0):
        """`train` and `total_steps` given: the rows come from elsewhere (benchmarks' synthetic batches)."""
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.out)
        validate(cfg)
        self.train = train or load_train_rows(
            cfg.data, cfg.teacher_emb, cfg.balance, cfg.clusters, cfg.max_bad_fraction, cfg.holdout
        )
        loaded = load_model(cfg.model, cfg.pretrained, env.device, cfg.seed)
        clip = loaded.model.train()
        if cfg.grad_checkpointing:
            clip.set_grad_checkpointing(True)
        if cfg.lock_text:
            lock_text_tower(clip)
        self.trim = padding_trimmer(clip)
        # The loader workers decode and augment to uint8; the float conversion and normalisation run
        # on the device (less to copy, less for the workers to do).
        self.preprocess, self.device_normalize = split_preprocess(loaded.train_preprocess)
        self.preprocess_val, self.tokenizer = loaded.preprocess, loaded.tokenizer
        student_dim = embedding_dim(clip)
        teacher_dim = self.train.store_img.dim if self.train.store_img is not None else student_dim
        self.objective = Objective(cfg, clip, student_dim, teacher_dim, self.train, env)
        self.student, self.pfc = self.objective.student, self.objective.pfc
        self.ddp = self.student
        if env.world_size > 1:
            # Heads of switched-off terms get no gradient: let DDP look for unused parameters.
            self.ddp = nn.parallel.DistributedDataParallel(
                self.student,
                device_ids=[env.device.index] if env.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        self.optimizer = build_optimizer(cfg, self.student)
        self.scaler = torch.amp.GradScaler(enabled=precision.needs_grad_scaler(cfg.precision, env.device))
        self.steps_per_epoch = total_steps or self._steps_per_epoch()
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup = warmup_steps(cfg, self.total_steps)
        self.too_short = too_short(self.total_steps, self.warmup, self.steps_per_epoch, cfg.epochs)
        if self.too_short and env.is_main:
            log.warning("distill: this run is too short to judge: %s", self.too_short)
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.run_folder = TrainingRun(self.out, env)
        self.values = StepValues(env.device)
        self._window: tuple[float, int] = (time.monotonic(), 0)  # samples since the last log line
        self._last_logged: dict[str, float] = {}
        self.writer = None

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

    def save_checkpoint(self) -> None:
        self.log_previous_step()  # nothing of a step whose loss was not finite may reach a checkpoint
        self.run_folder.save(
            self.step,
            self.epoch,
            self.step_in_epoch,
            self.student,
            self.optimizer,
            self.scaler,
            self.pfc,
            asdict(self.cfg),
            keep=self.cfg.keep_checkpoints,
        )

    # -- one step ------------------------------------------------------------------------------------

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        dev = self.env.device
        images = batch["images"].to(dev, non_blocking=True)
        if self.device_normalize is not None:
            images = self.device_normalize(images)
        tokens = self.trim(batch["tokens"]).to(dev, non_blocking=True)
        return self.objective.terms(self.ddp, batch, images, tokens, precision.autocast(dev, self.cfg.precision))

    def train_step(self, micro_batches: list[dict]) -> None:
        """One optimizer step. Its loss values reach the host without the step waiting for them
        (StepValues): they are checked and logged when the next step starts, or before a checkpoint."""
        lr = cosine_with_warmup(self.step, self.cfg.lr, self.warmup, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            terms = self.losses(batch)
            loss = self.objective.total(terms) / len(micro_batches)
            self.scaler.scale(loss).backward()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach() / len(micro_batches)
            sums["total"] = sums.get("total", 0.0) + loss.detach()
        if self.pfc is not None:
            self.pfc.finish_backward()
        if self.scaler.is_enabled() and self.pfc is not None and self.pfc.grad() is not None:
            self.pfc.grad().div_(self.scaler.get_scale())  # fp16: the classifier is not in the optimizer
        if self.cfg.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)
            grads = [p for g in self.optimizer.param_groups for p in g["params"]]
            if self.pfc is not None and self.pfc.grad() is not None:
                grads.append(self.pfc.active)
            torch.nn.utils.clip_grad_norm_(grads, self.cfg.grad_clip_norm)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = scale_before is not None and self.scaler.get_scale() < scale_before  # fp16 overflow
        if self.pfc is not None and not skipped:
            self.pfc.step(lr * self.cfg.pfc_lr_scale)
        with torch.no_grad():  # as open_clip: keep the temperature below 100
            self.student.clip.logit_scale.clamp_(0, math.log(100))
        self.values.push(self.step, sums, lr, self.epoch)

    def checked_values(self) -> dict[str, float] | None:
        """The last step's values, once they are on the host; a non-finite one stops training here,
        before anything of that step is saved."""
        done = self.values.pop()
        if done is None:
            return None
        step, logged = done
        bad = [name for name, value in logged.items() if not math.isfinite(value)]
        if bad:
            raise ClipcidError(
                f"step {step}: loss is not finite ({', '.join(n for n in bad if n != 'total') or 'total'}); "
                "nothing was saved from this step. Lower --lr, use fp32, or resume from the last checkpoint"
            )
        return logged

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.writer = self.run_folder.tensorboard()
        if cfg.resume:
            restored = self.run_folder.load(cfg.resume, self.student, self.optimizer, self.scaler, self.pfc)
            if restored is not None:
                self.step, self.epoch, self.step_in_epoch = restored
        stop_at = min(self.total_steps, cfg.max_steps or self.total_steps)
        self._window = (time.monotonic(), 0)
        with progress_bar(stop_at, "distill", "step", env.is_main) as bar:
            bar.update(self.step)
            while self.step < stop_at:
                micro: list[dict] = []
                for batch in self._loader():
                    micro.append(batch)
                    if len(micro) < cfg.accum_freq:
                        continue
                    self.log_previous_step()  # its values arrived while this batch was loading
                    self.train_step(micro)
                    micro = []
                    self.step += 1
                    self.step_in_epoch += 1
                    self._window = (self._window[0], self._window[1] + cfg.batch_size * cfg.accum_freq * env.world_size)
                    bar.update(1)
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
        self.log_previous_step()
        self.run_folder.export(self.student, self.pfc, asdict(cfg))
        if env.is_main:
            self._export_for_open_clip()
        if self.writer:
            self.writer.close()
        return {"steps": self.step, "last": self._last_logged}

    def _export_for_open_clip(self) -> None:
        cfg = self.cfg
        terms = ", ".join(f"{name} x {w:g}" for name, w in self.objective.weights.items() if w)
        self.run_folder.export_open_clip(
            cfg.model,
            f"`clipcid distill`: {self.step} steps of batch {cfg.batch_size} x {self.env.world_size} process(es) on "
            f"{self.train.total:,} pairs of `{cfg.data}`, loss terms {terms}; teacher embeddings "
            f"`{cfg.teacher_emb}`, balance `{cfg.balance}`, clusters `{cfg.clusters}`; lr {cfg.lr:g}, seed {cfg.seed}.",
        )

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

    def log_previous_step(self) -> None:
        """Check and log the last step whose values are on their way (see StepValues)."""
        step, epoch = self.values.pending_step, self.values.epoch
        logged = self.checked_values()
        if logged is not None:
            self._last_logged = logged
            self._log(step, epoch, logged)

    def _log(self, step: int, epoch: int, logged: dict[str, float]) -> None:
        if not self.env.is_main:
            return
        for name, value in logged.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        if step % self.cfg.log_every_n_steps == 0 or step == 1:
            start, samples = self._window
            rate = samples / max(time.monotonic() - start, 1e-9)
            self._window = (time.monotonic(), 0)
            terms = " ".join(f"{k} {v:.4f}" for k, v in logged.items() if k not in ("lr", "total"))
            log.info(
                "step %d/%d epoch %d: loss %.4f (%s) lr %.2e, %.1f samples/s",
                step,
                self.total_steps,
                epoch,
                logged["total"],
                terms,
                logged["lr"],
                rate,
            )
            self.run_folder.append(TRAIN_LOG, {"step": step, "epoch": epoch, **logged, "samples_per_s": rate})

    def evaluate(self) -> None:
        from clipcid.evaluation.features import OpenClipEncoder
        from clipcid.evaluation.run import EvalSuiteConfig, run_eval_suite

        if not self.env.is_main:
            barrier(self.env)
            return
        clip = self.student.clip
        clip.eval()
        encoder = OpenClipEncoder(
            clip, self.preprocess_val, self.tokenizer, self.env.device, "fp32", f"step{self.step}"
        )
        suite = EvalSuiteConfig(self.cfg.model, None, None, self.cfg.eval_suite_root, workers=0)
        result = run_eval_suite(suite, encoder=encoder)
        clip.train()
        for name, value in result["summary"].items():
            if value is not None:
                self.writer.add_scalar(f"eval/{name}", value, self.step)
        self.run_folder.append(EVAL_LOG, {"step": self.step, **result["summary"]})
        log.info("eval at step %d: %s", self.step, result["summary"])
        barrier(self.env)


def run_settings(cfg: DistillConfig) -> dict:
    """What the student follows from: the config, the number of processes (the global batch), and what
    the inputs were made from (so that a teacher, balance, clusters or hold-out made again means
    training again)."""
    from clipcid.balance.artifact import identity_of as balance_identity
    from clipcid.cluster.artifact import identity_of as clusters_identity
    from clipcid.embed.artifact import Embeddings
    from clipcid.holdout import HoldOut

    return {
        **{k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS},
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "inputs": {
            "teacher_emb": Embeddings.open(cfg.teacher_emb).identity if cfg.teacher_emb else None,
            "balance": balance_identity(cfg.balance) if cfg.balance else None,
            "clusters": clusters_identity(cfg.clusters) if cfg.clusters else None,
            "holdout": HoldOut.open(cfg.holdout).identity if cfg.holdout else None,
        },
    }


def finished_training(cfg: DistillConfig) -> dict | None:
    """What a run finished with these settings returned, or None: a file read, before any data or model
    loads."""
    validate(cfg)
    folder = TrainingRun.folder(cfg.out, run_settings(cfg), cfg.overwrite)
    done = folder.finished_run(lambda: student_path(cfg.out).is_file())
    return None if done is None else {"steps": done["steps"], "last": done.get("last", {})}


def distill(cfg: DistillConfig) -> dict:
    done = finished_training(cfg)
    if done is not None:
        return done
    folder = TrainingRun.folder(cfg.out, run_settings(cfg), cfg.overwrite)
    with distributed(cfg.device) as env:
        if env.world_size > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // env.world_size))
        if env.is_main:
            folder.claim()
        barrier(env)
        try:
            trainer = Trainer(cfg, env)
            described = {
                **asdict(cfg),
                "world_size": env.world_size,
                "steps_per_epoch": trainer.steps_per_epoch,
                "total_steps": trainer.total_steps,
                "warmup_steps": trainer.warmup,
                "too_short": trainer.too_short,
                "train_rows": trainer.train.total,
            }
            if env.is_main:
                folder.update(described)
            result = trainer.run()
            if env.is_main:
                summary = {**described, "steps": result["steps"], "last": result["last"]}
                if result["steps"] >= trainer.total_steps:
                    folder.finish(summary)
                else:  # stopped by --max-steps: the student is written, the run resumes when asked
                    folder.update(summary)
            return result
        finally:
            folder.release()
