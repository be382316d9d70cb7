"""Held-out retrieval split by what the pictures are (emoji, icon, flag), for any number of models.

Not a timing: the demo's held-out retrieval task (`heldout_retrieval`, recall@5 averaged over both
directions, every query ranked against the whole gallery) scored again per model, then broken down by
the corpus kind of each query's pair. It tells which part of the held-out pairs a difference between
two students comes from (Table 4's and Table 7's readings in docs/results.md). The anchor is the first
model; each model is an open_clip folder (`local-dir:`), e.g. a run's `train/open_clip`.

    python benchmarks/heldout_by_kind.py --demo demo \
        demo/study/runs/cid/seed0/train/open_clip demo/study/runs/clip_only/seed0/train/open_clip
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import torch
from PIL import Image

from clipcid.evaluation.zeroshot_retrieval import ranks
from clipcid.holdout import HoldOut
from clipcid.inputs.shards import iter_tar_samples
from clipcid.util.tables import format_table

KINDS = ("emoji", "icon", "flag")


def gallery(demo: Path) -> tuple[list[Image.Image], list[str], np.ndarray]:
    """The held-out pairs in the gallery's order, with each pair's corpus kind."""
    holdout = HoldOut.open(demo / "holdout")
    pairs = holdout.pairs().to_pydict()
    shards = sorted((demo / "corpus").glob("*.parquet"))
    kinds = [pq.read_table(s, columns=["kind"]).column("kind").to_pylist() for s in shards]
    images, captions = [], []  # the gallery's shards hold the pairs in the index's order
    shards_dir = holdout.gallery / "test"
    for n in range(int((shards_dir / "nshards.txt").read_text())):
        for sample in iter_tar_samples(shards_dir / f"{n}.tar"):
            picture = next(sample[e] for e in ("png", "jpg", "jpeg", "webp") if e in sample)
            images.append(Image.open(io.BytesIO(picture)).convert("RGB"))
            captions.append(sample["txt"].decode())
    if captions != pairs["caption"] or len(images) != len(captions):
        raise SystemExit(f"error: {holdout.gallery}: gallery and index differ; hold out again")
    kind = np.array([kinds[p][r] for p, r in zip(pairs["part"], pairs["row"], strict=True)], dtype=object)
    return images, captions, kind


@torch.no_grad()
def recall_at_5(folder: str, images: list[Image.Image], captions: list[str], batch: int = 256) -> np.ndarray:
    """Per pair: the mean of text→image and image→text hits in the top 5 (0, 0.5 or 1)."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    img = torch.cat([model.encode_image(torch.stack([preprocess(i) for i in images[a : a + batch]]))
                     for a in range(0, len(images), batch)])  # fmt: skip
    txt = torch.cat([model.encode_text(tokenizer(captions[a : a + batch])) for a in range(0, len(captions), batch)])
    norm = torch.nn.functional.normalize
    r = ranks(norm(img, dim=-1).numpy(), [[c] for c in captions], norm(txt, dim=-1).numpy())
    return ((r.text_rank < 5).astype(float) + (r.image_rank < 5)) / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, help="a finished `clipcid demo` folder (its holdout and corpus)")
    p.add_argument("models", nargs="+", help="open_clip folders (local-dir:); the first is the anchor")
    args = p.parse_args()
    images, captions, kind = gallery(Path(args.demo))
    counts = ", ".join(f"{k} {(kind == k).sum():,}" for k in KINDS)
    print(f"{args.demo}: {len(captions):,} held-out pairs ({counts}); recall@5 (%), both directions\n")
    rows, anchor = [], None
    for folder in args.models:
        hits = recall_at_5(folder, images, captions)
        anchor = hits.mean() if anchor is None else anchor
        ratio = f"{hits.mean() / anchor:.2f}×" if anchor > 0 else "–"
        by_kind = [f"{100 * hits[kind == k].mean():.1f}" for k in KINDS]
        rows.append([folder, f"{100 * hits.mean():.1f}", *by_kind, ratio])
    print(format_table(["model", "all", *KINDS, "all ÷ anchor"], rows))


if __name__ == "__main__":
    main()
