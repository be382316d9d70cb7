"""How many images a second `distill`'s loader delivers: decoding, augmentation and collation of 256-px
JPEG webdataset shards (img2dataset's default output) with the teacher embeddings joined, as training
reads them, for a ViT-B/32 student (224 px, open_clip's training transform).

Two variants, timed alternately: the whole transform in the loader workers (float batches, as before),
and what `distill` does now, the workers stopping at uint8 and the float conversion and normalisation
running on the device. The table gives images/s and the ratio to the first (the anchor), per worker
count. No model runs: the loader alone, so the figure is what a GPU could be fed.

    python benchmarks/loader.py --out /tmp/loader --workers 2
    python benchmarks/loader.py --out /tmp/loader --workers 8 16     # on a 16-core GPU machine
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageDraw, ImageFilter

from clipcid.distill.data import DeviceNormalize, TrainBatches, load_train_rows, split_preprocess
from clipcid.embed.artifact import write_part
from clipcid.inputs.shards import write_tar_atomic
from clipcid.models import load_model


def picture(rng: np.random.Generator, size: int) -> bytes:
    """A 256-px JPEG with texture (noise under shapes, blurred), quality 95 as img2dataset writes."""
    noise = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size - 40, 2)
        x1, y1 = x0 + rng.integers(20, 120), y0 + rng.integers(20, 120)
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    image.filter(ImageFilter.GaussianBlur(1)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_data(root: Path, shards: int, per_shard: int, size: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    for s in range(shards):
        keys = [f"{s:05d}{r:05d}" for r in range(per_shard)]
        samples = [{"__key__": k, "jpg": picture(rng, size), "txt": f"picture {k}"} for k in keys]
        write_tar_atomic(root / "shards" / f"{s:05d}.tar", samples)
        vectors = rng.normal(size=(per_shard, dim)).astype(np.float16)
        meta = {"key": pa.array(keys), "valid": pa.array([True] * per_shard)}
        write_part(root / "emb", s, shards, vectors, vectors, meta)


def rate(train, preprocess, tokenizer, batch: int, workers: int, batches: int, normalize) -> float:
    dataset = TrainBatches(train, preprocess, tokenizer, batch, 0, 0, 0, 1, max(1, workers), batches + 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=False)
    it = iter(loader)
    first = next(it)  # workers started and warm
    normalize(first["images"])
    start, n = time.perf_counter(), 0
    for b in it:
        normalize(b["images"])  # on the CPU here; on a GPU this runs there
        n += len(b["images"])
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, nargs="+", default=[2])
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--per-shard", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=24, help="batches timed per measurement")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    root = Path(args.out)
    if not (root / "emb").is_dir():
        write_data(root, args.shards, args.per_shard, 256, 64)
    loaded = load_model(args.model)
    train = load_train_rows(str(root / "shards"), str(root / "emb"), None, None)
    on_workers, on_device = loaded.train_preprocess, split_preprocess(loaded.train_preprocess)
    variants = {
        "whole transform in the workers (float batches)": (on_workers, lambda x: x),
        "workers stop at uint8, normalise on the device": on_device,
    }
    print(f"{args.model} training transform, 256-px JPEG shards, batch {args.batch_size}, {torch.get_num_threads()} "
          "threads in the main process\n")  # fmt: skip
    print("| loader | workers | images/s | per worker | × anchor |\n|---|---:|---:|---:|---:|")
    for workers in args.workers:
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, (preprocess, normalize) in variants.items():
                normalize = normalize or DeviceNormalize((0.0,), (1.0,))
                r = rate(train, preprocess, loaded.tokenizer, args.batch_size, workers, args.batches, normalize)
                best[name] = max(best.get(name, 0.0), r)
        anchor = next(iter(best.values()))
        for name, r in best.items():
            print(f"| {name} | {workers} | {r:.0f} | {r / max(workers, 1):.0f} | {r / anchor:.2f} |")


if __name__ == "__main__":
    main()
