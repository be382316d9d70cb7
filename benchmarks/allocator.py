"""Where large activations' memory comes from, measured: glibc's defaults against the settings clipcid
makes at start-up (clipcid/util/allocator.py) and the other ways out, on the two CPU workloads of the
demo that allocate most: the teacher's feature pass (a timm CNN at --size px, batch --batch, inference)
and the student's training step (--student, batch --train-batch, CLIP loss, forward and backward).

Each contender runs in a process of its own (glibc reads MALLOC_* and LD_PRELOAD only at start):
  default                glibc as it starts
  keep (clipcid)         mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GB: large blocks from the heap, kept
  threshold 32 MB        mallopt M_MMAP_THRESHOLD at its ceiling (blocks above it are still mmapped)
  small batches          the default allocator with the feature pass at batch --small-batch
  jemalloc / tcmalloc    LD_PRELOAD of Debian's libjemalloc2 / libtcmalloc-minimal4, where installed

It prints per contender: images per second, user and system CPU seconds and minor page faults per image
of the timed batches, and the peak resident memory; the ratio is against the default, measured in the
same run. Rounds alternate the contenders; each keeps its best rate.

    python benchmarks/allocator.py [--rounds 2] [--batches 6]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PRELOADS = {
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
}


def contenders(args) -> dict[str, dict]:
    found = {
        "default": {},
        "keep (clipcid)": {"mallopt": "keep"},
        "threshold 32 MB": {"mallopt": "threshold"},
        f"small batches ({args.small_batch})": {"batch": args.small_batch},
    }
    for name, path in PRELOADS.items():
        if Path(path).is_file():
            found[name] = {"preload": path}
    return found


def work(args) -> dict:
    """In the child: apply the contender's setting, warm up, time --batches batches."""
    import torch

    from clipcid.util.allocator import KEEP, set_malloc

    if args.mallopt == "keep":
        set_malloc(KEEP)
    elif args.mallopt == "threshold":
        set_malloc({"M_MMAP_THRESHOLD": 32 * 2**20, "M_TRIM_THRESHOLD": 2**31 - 1})
    torch.manual_seed(0)
    if args.workload == "teacher":
        import timm

        model = timm.create_model(args.trunk, pretrained=False).eval()
        batch = args.batch_override or args.batch
        x = torch.randn(batch, 3, args.size, args.size)

        def step():
            with torch.inference_mode():
                model(x)

        per_step = batch
    else:
        import open_clip

        from clipcid.models import load_model

        loaded = load_model(args.student, None, "cpu", 0)
        model = loaded.model.train()
        size = model.visual.image_size
        size = size[0] if isinstance(size, tuple) else size
        x = torch.randn(args.train_batch, 3, size, size)
        tokens = loaded.tokenizer([f"a caption number {i}" for i in range(args.train_batch)])
        loss_fn = open_clip.ClipLoss()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            img, txt, scale = model(x, tokens)[:3]
            loss = loss_fn(img, txt, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        per_step = args.train_batch
    step()  # warm-up: the first batch maps memory under every allocator
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.batches):
        step()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    n = per_step * args.batches
    return {
        "images_per_second": n / seconds,
        "user": after.ru_utime - before.ru_utime,
        "system": after.ru_stime - before.ru_stime,
        "faults_per_image": (after.ru_minflt - before.ru_minflt) / n,
        "peak_rss_mb": after.ru_maxrss / 1024,
    }


def run_child(args, workload: str, setting: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", workload, "--batches", str(args.batches), "--trunk", args.trunk,
           "--size", str(args.size), "--batch", str(args.batch), "--student", args.student,
           "--train-batch", str(args.train_batch)]  # fmt: skip
    if "mallopt" in setting:
        cmd += ["--mallopt", setting["mallopt"]]
    if "batch" in setting and workload == "teacher":
        cmd += ["--batch-override", str(setting["batch"])]
    env = dict(os.environ)
    if "preload" in setting:
        env["LD_PRELOAD"] = setting["preload"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", type=int, default=6, help="timed batches per process")
    ap.add_argument("--trunk", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=256, help="the teacher's feature-pass batch (lit's default)")
    ap.add_argument("--small-batch", type=int, default=32)
    ap.add_argument("--student", default="clipcid-tiny")
    ap.add_argument("--train-batch", type=int, default=128, help="the demo's distill batch")
    ap.add_argument("--workloads", nargs="+", default=["teacher", "student"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mallopt", help=argparse.SUPPRESS)
    ap.add_argument("--batch-override", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.workload = args.child
        print(json.dumps(work(args)))
        return
    from clipcid.util.machine import cpu_name

    print(f"{cpu_name()}, {os.cpu_count()} cores")
    for workload in args.workloads:
        options = contenders(args)
        if workload != "teacher":
            options = {k: v for k, v in options.items() if "batch" not in v}
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for name, setting in options.items():
                got = run_child(args, workload, setting)
                if name not in best or got["images_per_second"] > best[name]["images_per_second"]:
                    best[name] = got
        anchor = best["default"]["images_per_second"]
        what = (
            f"{args.trunk} at {args.size} px, batch {args.batch}, inference"
            if workload == "teacher"
            else f"{args.student} training step, batch {args.train_batch}"
        )
        print(f"\n{workload}: {what}; {args.batches} timed batches, best of {args.rounds}\n")
        print("| allocator | images/s | ratio | user s | system s | minor faults per image | peak RSS MB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, r in best.items():
            print(
                f"| {name} | {r['images_per_second']:.1f} | {r['images_per_second'] / anchor:.2f} | {r['user']:.1f} | "
                f"{r['system']:.1f} | {r['faults_per_image']:.0f} | {r['peak_rss_mb']:.0f} |"
            )


if __name__ == "__main__":
    main()
