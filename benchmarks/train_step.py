"""What the CID terms cost on top of a plain CLIP training step, measured with the trainer's own step.

Synthetic inputs (no data loading): one batch of random images, tokens, teacher embeddings and cluster
labels, on the device. Three steps, timed alternately in rounds so that machine noise hits them alike,
each the median of --steps steps after warm-ups, the best round kept:

- plain: `distill`'s step with the CLIP loss only;
- CID:   the same step with every CID term (CLIP + cluster CE + KL over a PartialFC classifier of --k
         classes at --sample-rate + instance), the teacher offline (its embeddings are inputs);
- online: open_clip-style distillation, the teacher model running forward on every batch
          (--teacher-model) plus the similarity loss.

The table gives their times, the ratios to plain measured in the same run, and on a GPU the peak memory
of plain and CID. With --profile DIR a torch.profiler trace of CID steps goes to DIR and its busiest
operations (and the host synchronisations) are printed.

    python benchmarks/train_step.py                                   # the CPU defaults: clipcid-tiny
    python benchmarks/train_step.py --device cuda --precision bf16 --model ViT-B-32 --k 1000000 \\
        --sample-rate 0.1 --teacher-dim 1280 --batch-size 256 --teacher-model ViT-L-14
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from clipcid.distill.train import DistillConfig, Trainer
from clipcid.losses.baselines import similarity_distillation
from clipcid.models import load_model
from clipcid.stage import DistEnv, pick_device
from clipcid.util import precision as amp


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_trainer(args, device: torch.device, cid: bool) -> Trainer:
    weights = {} if cid else {"w_cls": 0.0, "w_kl": 0.0, "w_ins": 0.0}
    cfg = DistillConfig(
        data="",
        out="/tmp/clipcid-train-step",
        model=args.model,
        teacher_emb="synthetic" if cid else None,
        batch_size=args.batch_size,
        precision=args.precision,
        pfc_sample_rate=args.sample_rate,
        device=str(device),
        **weights,
    )
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(args.k, args.teacher_dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    train = SimpleNamespace(
        store_img=SimpleNamespace(dim=args.teacher_dim) if cid else None,
        num_classes=args.k if cid else 0,
        centroids=centroids if cid else None,
        total=0,
    )
    env = DistEnv(0, 1, 0, device)
    return Trainer(cfg, env, train=train, total_steps=10_000)


def synthetic_batch(args, trainer: Trainer, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    size = trainer.student.clip.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    context = trainer.tokenizer.context_length
    return {
        "images": torch.randn(args.batch_size, 3, size, size, generator=g).to(device),
        "tokens": torch.randint(1, 40000, (args.batch_size, context), generator=g).to(device),
        "teacher_img": F.normalize(torch.randn(args.batch_size, args.teacher_dim, generator=g), dim=1).to(device),
        "teacher_txt": F.normalize(torch.randn(args.batch_size, args.teacher_dim, generator=g), dim=1).to(device),
        "labels": torch.randint(0, args.k, (args.batch_size,), generator=g).to(device),
    }


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", help="fp32 or bf16 (autocast)")
    p.add_argument("--model", default="clipcid-tiny", help="student architecture")
    p.add_argument("--teacher-model", default="clipcid-small", help="the online teacher's architecture")
    p.add_argument("--k", type=int, default=1000, help="clusters")
    p.add_argument(
        "--sample-rate", type=float, default=None, help="PartialFC sample rate (default: 1.0, 0.1 above 100k)"
    )
    p.add_argument("--teacher-dim", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--profile", default=None, help="write a torch.profiler trace of CID steps here")
    args = p.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)

    plain_trainer, cid_trainer = make_trainer(args, device, cid=False), make_trainer(args, device, cid=True)
    batch = synthetic_batch(args, cid_trainer, device)
    teacher = load_model(args.teacher_model, None, device).model.eval()

    def plain():
        plain_trainer.train_step([batch])
        plain_trainer.values.pop()

    def cid():
        cid_trainer.train_step([batch])
        cid_trainer.values.pop()

    t = plain_trainer

    def online():
        with torch.no_grad(), amp.autocast(device, args.precision):
            ti = F.normalize(teacher.encode_image(batch["images"]).float(), dim=1)
            tt = F.normalize(teacher.encode_text(batch["tokens"]).float(), dim=1)
        t.optimizer.zero_grad(set_to_none=True)
        with amp.autocast(device, args.precision):
            f = t.student(batch["images"], batch["tokens"], need_cls=False, need_proj=False)
        img, txt, scale = f["img"].float(), f["txt"].float(), f["logit_scale"].float()
        loss = t.objective.clip_loss(img, txt, scale) + similarity_distillation(img, txt, scale, ti, tt)
        loss.backward()
        t.optimizer.step()

    results: dict[str, list[float]] = {"plain": [], "cid": [], "online": []}
    peak: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, fn in (("plain", plain), ("cid", cid), ("online", online)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            results[name].append(timed(fn, args.steps, args.warmup, device))
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
    best = {name: min(v) for name, v in results.items()}
    rate = cid_trainer.pfc.sample_rate if cid_trainer.pfc is not None else 1.0
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{where}, torch {torch.__version__}, {args.precision}, student {args.model}, batch {args.batch_size}, "
          f"teacher dim {args.teacher_dim}; median of {args.steps} steps after {args.warmup}, best of {args.rounds} "
          "alternating rounds\n")  # fmt: skip
    memory = f"{peak['plain']:.1f} → {peak['cid']:.1f} GiB" if peak else "–"
    print("| batch | classes | sample rate | plain CLIP step | CID step (all terms) | CID / plain | "
          f"online KD, {args.teacher_model} forward | peak memory plain → CID |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.batch_size} | {args.k:,} | {rate:g} | {1000 * best['plain']:.1f} ms | {1000 * best['cid']:.1f} ms "
        f"| **{best['cid'] / best['plain']:.2f}** | {1000 * best['online']:.1f} ms "
        f"({best['online'] / best['plain']:.2f}×) | {memory} |"
    )
    if args.profile:
        profile(cid, device, args.profile)


def profile(step, device: torch.device, folder: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=False) as prof:
        for _ in range(5):
            step()
        synchronize(device)
    prof.export_chrome_trace(f"{folder}/cid_steps.json")
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))
    syncs = sum(e.count for e in prof.key_averages() if "Synchronize" in e.key)
    print(f"host synchronisations in 5 CID steps: {syncs}")


if __name__ == "__main__":
    main()
