"""Training-step cost of the CID terms, in one run (same student, same batch, synthetic inputs, so
that data loading is out of the picture):

(a) all CID terms (CLIP + cluster CE + KL + instance) against the plain CLIP loss: goal <= 1.10x,
    the teacher being offline;
(b) open_clip-style online distillation (the teacher runs forward on every batch) with a teacher
    about 4x the student (clipcid-small, 3.5x the parameters, 7.7x the image tower);
(c) PartialFC alone at k = 100k and 1M classes, sample rate 0.1 against the full classifier:
    time of forward + backward and peak memory (each in a fresh process).

    python benchmarks/train_step.py --batch-size 64 --steps 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from clipcid.distill.train import Student
from clipcid.losses.baselines import similarity_distillation
from clipcid.losses.partial_fc import PartialFC
from clipcid.models import register_model_configs

register_model_configs()  # the project's configs, for open_clip.create_model("clipcid-tiny")

TEACHER_DIM = 384


def median_step(fn, steps: int) -> float:
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        fn()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def student_steps(batch: int, steps: int, k: int) -> dict[str, float]:
    torch.manual_seed(0)
    clip = open_clip.create_model("clipcid-tiny")
    student = Student(clip, 256, TEACHER_DIM, "linear")
    pfc = PartialFC(F.normalize(torch.randn(k, TEACHER_DIM), dim=1), k, TEACHER_DIM, sample_rate=1.0)
    opt = torch.optim.AdamW(list(student.parameters()) + list(pfc.parameters()), lr=1e-4)
    images = torch.randn(batch, 3, 64, 64)
    tokens = torch.randint(1, 49000, (batch, 32))
    t_img = F.normalize(torch.randn(batch, TEACHER_DIM), dim=1)
    t_txt = F.normalize(torch.randn(batch, TEACHER_DIM), dim=1)
    labels = torch.randint(0, k, (batch,))
    clip_loss = open_clip.ClipLoss()
    teacher = open_clip.create_model("clipcid-small").eval()

    def plain():
        f = student(images, tokens, need_cls=False, need_proj=False)
        loss = clip_loss(f["img"], f["txt"], f["logit_scale"])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def cid():
        f = student(images, tokens, t_img, t_txt)
        terms = pfc(f["cls_img"], t_img, labels)
        loss = clip_loss(f["img"], f["txt"], f["logit_scale"]) + terms["cls"] + 0.5 * terms["kl"] + f["ins"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    def online():
        with torch.no_grad():
            ti = F.normalize(teacher.encode_image(images), dim=1)
            tt = F.normalize(teacher.encode_text(tokens), dim=1)
        f = student(images, tokens, need_cls=False, need_proj=False)
        loss = clip_loss(f["img"], f["txt"], f["logit_scale"]) + similarity_distillation(
            f["img"], f["txt"], f["logit_scale"], ti, tt
        )
        opt.zero_grad()
        loss.backward()
        opt.step()

    # Alternate the variants so that machine noise hits all of them alike.
    results = {"plain": [], "cid": [], "online": []}
    for _ in range(3):
        for name, fn in (("plain", plain), ("cid", cid), ("online", online)):
            results[name].append(median_step(fn, max(1, steps // 3)))
    return {name: min(v) for name, v in results.items()}


def pfc_child(k: int, rate: float, batch: int, dim: int) -> None:
    """In a fresh process: time and peak memory of PartialFC forward + backward."""
    torch.manual_seed(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter: count only what follows
    base = _rss_kb("VmRSS")
    pfc = PartialFC(F.normalize(torch.randn(k, dim), dim=1), k, dim, sample_rate=rate)
    student = torch.randn(batch, dim, requires_grad=True)
    teacher = torch.randn(batch, dim)
    labels = torch.randint(0, k, (batch,))

    def step():
        terms = pfc(student, teacher, labels)
        pfc.weight.grad = None
        (terms["cls"] + terms["kl"]).backward()

    seconds = median_step(step, 5)
    print(json.dumps({"seconds": seconds, "peak_mb": (_rss_kb("VmHWM") - base) / 1024}))


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--k", type=int, default=1000, help="clusters for (a)")
    p.add_argument("--pfc-batch", type=int, default=256)
    p.add_argument("--pfc-dim", type=int, default=512)
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--pfc-only", action="store_true", help="only the PartialFC table")
    args = p.parse_args()
    if args.child:
        pfc_child(int(args.child[0]), float(args.child[1]), args.pfc_batch, args.pfc_dim)
        return
    if not args.pfc_only:
        step_table(args)
    pfc_table(args)


def step_table(args) -> None:
    t = student_steps(args.batch_size, args.steps, args.k)
    print(
        f"clipcid-tiny student, batch {args.batch_size}, teacher dim {TEACHER_DIM}, k {args.k}, "
        f"threads {torch.get_num_threads()}\n"
    )
    print("| step | seconds | ratio to plain CLIP |")
    print("|---|---:|---:|")
    print(f"| plain CLIP loss (anchor) | {t['plain']:.3f} | 1.000 |")
    print(
        f"| CLIP + cluster CE + KL + instance (CID, teacher offline) | {t['cid']:.3f} | {t['cid'] / t['plain']:.3f} |"
    )
    print(
        f"| CLIP + online similarity distillation (clipcid-small teacher forward) | {t['online']:.3f} | "
        f"{t['online'] / t['plain']:.3f} |"
    )


def pfc_table(args) -> None:
    print(
        f"\nPartialFC forward + backward (peak memory above the process's RSS before), batch {args.pfc_batch}, "
        f"dim {args.pfc_dim}\n"
    )
    print("| classes | sample rate | seconds | ratio | peak MB |")
    print("|---:|---:|---:|---:|---:|")
    for k in (100_000, 1_000_000):
        rows = {}
        for rate in (1.0, 0.1):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(k),
                    str(rate),
                    "--pfc-batch",
                    str(args.pfc_batch),
                    "--pfc-dim",
                    str(args.pfc_dim),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[rate] = json.loads(out.stdout.strip().splitlines()[-1])
        for rate in (1.0, 0.1):
            r = rows[rate]
            label = "1.0 (full, anchor)" if rate == 1.0 else str(rate)
            print(
                f"| {k:,} | {label} | {r['seconds']:.3f} | {r['seconds'] / rows[1.0]['seconds']:.3f} | "
                f"{r['peak_mb']:.0f} |"
            )


if __name__ == "__main__":
    main()
