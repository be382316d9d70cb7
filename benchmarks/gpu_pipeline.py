"""The whole pipeline on one CUDA GPU, at ViT-B/32 scale, on synthetic shards: a check that the GPU
paths run (bf16 autocast in embed, distill and eval; faiss k-means; pinned-memory loading) and how
fast they are. Run by hand on a GPU machine:

    python benchmarks/gpu_pipeline.py --out /tmp/gpu-check

Stages: shards of coloured shapes as img2dataset writes them by default (256-px JPEG, quality 95) ->
`embed` with a randomly initialised larger teacher ->
`balance` -> `cluster` -> `distill` of the student twice (CLIP loss only, then all CID terms) ->
zero-shot + linear probe of the CID student on a held-out image folder of the same shapes.
Prints one table: seconds and images/s per stage, and the CID step's cost against the CLIP-only
step measured in the same run (the anchor). The random teacher makes the accuracies meaningless;
what is checked is that every stage runs on the GPU, its losses stay finite, and its speed.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import COLOURS, SHAPES, shape_png  # noqa: E402

from clipcid.balance import BalanceConfig, balance  # noqa: E402
from clipcid.cluster import ClusterConfig, cluster  # noqa: E402
from clipcid.distill.train import DistillConfig, distill  # noqa: E402
from clipcid.embed import EmbedConfig, embed  # noqa: E402
from clipcid.evaluation.run import EvalConfig, run_eval  # noqa: E402
from clipcid.inputs.shards import write_tar_atomic  # noqa: E402


def as_jpeg(png: bytes) -> bytes:
    buf = io.BytesIO()
    with Image.open(io.BytesIO(png)) as im:
        im.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shard(args: tuple[Path, int, int, int, str]) -> None:
    folder, index, per_shard, size, image_format = args
    rng = np.random.default_rng(index)
    samples = []
    for r in range(per_shard):
        colour, shape = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
        png = shape_png(colour, shape, size=size, jitter=int(rng.integers(24)))
        samples.append(
            {
                "__key__": f"{index:05d}{r:05d}",
                image_format: as_jpeg(png) if image_format == "jpg" else png,
                "txt": f"a {colour} {shape}",
                "json": {"colour": colour, "shape": shape},
            }
        )
    write_tar_atomic(folder / f"{index:05d}.tar", samples)


def write_imagefolder(root: Path, per_class: int, size: int) -> None:
    rng = np.random.default_rng(12345)
    for split in ("train", "test"):
        for shape in SHAPES:
            d = root / split / shape
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                colour = COLOURS[rng.integers(len(COLOURS))]
                (d / f"{i}.png").write_bytes(shape_png(colour, shape, size=size, jitter=int(rng.integers(24))))
    (root / "templates.txt").write_text("a {c}.\na drawing of a {c}.\n")


def train_rate(run: Path) -> tuple[float, dict]:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows[1:]] or [rows[-1]["samples_per_s"]]  # first row holds warm-up
    losses = {k: v for k, v in rows[-1].items() if k not in ("step", "epoch", "lr", "samples_per_s")}
    return statistics.median(rates), losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--per-shard", type=int, default=1024)
    p.add_argument("--size", type=int, default=256, help="image side (img2dataset's default 256)")
    p.add_argument("--format", default="jpg", choices=["jpg", "png"], help="image encoding (img2dataset: jpg)")
    p.add_argument("--teacher", default="ViT-L-14")
    p.add_argument("--student", default="ViT-B-32")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--workers", type=int, default=12)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("warning: no CUDA device; running on the CPU (a dry run: use tiny settings)")
    out = Path(args.out)
    data = out / "shards"
    data.mkdir(parents=True, exist_ok=True)
    n = args.shards * args.per_shard
    rows: list[tuple[str, float, float | None, str]] = []

    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        jobs = [(data, i, args.per_shard, args.size, args.format) for i in range(args.shards)]
        list(pool.map(write_shard, jobs))
    write_imagefolder(out / "heldout", per_class=128, size=args.size)
    rows.append(("synthetic shards", time.perf_counter() - start, None, f"{n} pairs, {args.size} px {args.format}"))

    start = time.perf_counter()
    embed(
        EmbedConfig(
            data=str(data),
            model=args.teacher,
            out=str(out / "emb"),
            batch_size=512,
            precision=args.precision,
            workers=args.workers,
        )
    )
    sec = time.perf_counter() - start
    rows.append((f"embed ({args.teacher}, random init)", sec, n / sec, args.precision))

    start = time.perf_counter()
    stats = balance(BalanceConfig(emb=str(out / "emb"), out=str(out / "balance"), target_removal=0.3))
    rows.append(("balance", time.perf_counter() - start, None, f"removed {stats['removed_fraction']:.1%}"))
    start = time.perf_counter()
    cstats = cluster(
        ClusterConfig(emb=str(out / "emb"), out=str(out / "clusters"), balance=str(out / "balance"), k=args.k)
    )
    rows.append(("cluster (faiss)", time.perf_counter() - start, None, f"k={cstats['k']}"))

    common = dict(
        data=str(data),
        teacher_emb=str(out / "emb"),
        balance=str(out / "balance"),
        model=args.student,
        batch_size=args.batch_size,
        epochs=args.epochs,
        precision=args.precision,
        workers=args.workers,
        lr=5e-4,
        warmup=10,
        log_every_n_steps=5,
    )
    rates = {}
    variants = {"clip": dict(w_cls=0.0, w_kl=0.0, w_ins=0.0), "cid": dict(clusters=str(out / "clusters"))}
    for name, weights in variants.items():
        run = out / f"student-{name}"
        start = time.perf_counter()
        result = distill(DistillConfig(out=str(run), **common, **weights))
        sec = time.perf_counter() - start
        rates[name], losses = train_rate(run)
        if not all(np.isfinite(v) for v in losses.values()):
            sys.exit(f"error: non-finite loss in {name}: {losses}")
        note = f"{result['steps']} steps; " + ", ".join(f"{k}={v:.3f}" for k, v in losses.items())
        rows.append((f"distill {args.student} ({name})", sec, rates[name], note))

    start = time.perf_counter()
    records = []
    for task in ("zeroshot_classification", "linear_probe"):
        records += run_eval(
            EvalConfig(
                model=args.student,
                pretrained=str(out / "student-cid" / "student.pt"),
                dataset=f"imagefolder:{out / 'heldout'}",
                task=task,
                precision=args.precision,
                workers=args.workers,
            )
        )

    def acc(record: dict) -> float:
        return record["metrics"].get("acc1", record["metrics"].get("lp_acc1", float("nan")))

    metrics = ", ".join(f"{r['task']}: {acc(r):.3f}" for r in records)
    rows.append(("eval (zero-shot + linear probe)", time.perf_counter() - start, None, metrics))

    buf = io.StringIO()
    if torch.cuda.is_available():
        buf.write(
            f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, peak memory "
            f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB\n\n"
        )
    buf.write("| stage | seconds | images/s | note |\n|---|---:|---:|---|\n")
    for stage, sec, rate, note in rows:
        buf.write(f"| {stage} | {sec:.1f} | {'' if rate is None else f'{rate:.0f}'} | {note} |\n")
    buf.write(f"\nCID step time / CLIP-only step time (anchor): {rates['clip'] / rates['cid']:.3f}\n")
    print(buf.getvalue())
    (out / "table.md").write_text(buf.getvalue())


if __name__ == "__main__":
    main()
