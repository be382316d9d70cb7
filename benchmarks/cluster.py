"""Clustering benchmark, in one run:

(a) `clipcid cluster` (random init, as faiss) against calling faiss.Kmeans directly on the same data
    and settings (loading the same parts, training, labelling every row with its index): time ratio
    (goal <= 1.1) and objective;
(b) with --two-level-n: two-level k-means against flat k-means at k = --two-level-k on that many
    rows (the issue asks 1M x 512 at k = 10k): time and mean similarity to the centroid.

    python benchmarks/cluster.py --n 200000 --dim 512 --k 1000 [--two-level-n 1000000 --two-level-k 10000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from clipcid.cluster import ClusterConfig, cluster


def write_blobs(root: Path, n: int, dim: int, centres: int, seed: int = 0, part_rows: int = 100_000) -> Path:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, n, part_rows)):
        rows = min(part_rows, n - start)
        x = c[rng.integers(centres, size=rows)] + 0.05 * rng.standard_normal((rows, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(root / "img_emb" / f"img_emb_{i}.npy", x.astype(np.float16))
    return root


def load_all(root: Path) -> np.ndarray:
    files = sorted((root / "img_emb").glob("*.npy"), key=lambda p: int(p.stem.split("_")[2]))
    x = np.concatenate([np.load(f).astype(np.float32) for f in files])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def faiss_direct(emb: Path, k: int, niter: int, seed: int, max_points: int) -> tuple[float, float]:
    """What a user would write: load the parts, normalise, train, label every row."""
    start = time.perf_counter()
    x = load_all(emb)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, max_points_per_centroid=max_points)
    km.train(x)
    sims, _ = km.index.search(x, 1)
    return time.perf_counter() - start, float(sims.mean())


def ours(emb: Path, out: Path, k: int, niter: int, seed: int, max_points: int, **kw) -> tuple[float, dict]:
    start = time.perf_counter()
    stats = cluster(
        ClusterConfig(
            emb=str(emb),
            out=str(out),
            k=k,
            niter=niter,
            seed=seed,
            max_points_per_centroid=max_points,
            plots=False,
            **kw,
        )
    )
    return time.perf_counter() - start, stats


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--max-points-per-centroid", type=int, default=256)
    p.add_argument("--two-level-n", type=int, default=0)
    p.add_argument("--two-level-k", type=int, default=10_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipcid-bench-cluster-") as tmp:
        tmp = Path(tmp)
        emb = write_blobs(tmp / "emb", args.n, args.dim, centres=args.k)
        anchor_s, anchor_sim = faiss_direct(emb, args.k, args.niter, 0, args.max_points_per_centroid)
        ours_s, stats = ours(emb, tmp / "ours", args.k, args.niter, 0, args.max_points_per_centroid, init="random")
        print(f"{args.n:,} x {args.dim}, k {args.k:,}, niter {args.niter}, random init, seed 0\n")
        print(row("method", "seconds", "ratio", "mean similarity to centroid"))
        print(row("---", "---:", "---:", "---:"))
        print(row("faiss.Kmeans + index.search (anchor)", f"{anchor_s:.1f}", "1.000", f"{anchor_sim:.5f}"))
        print(
            row(
                "clipcid cluster",
                f"{ours_s:.1f}",
                f"{ours_s / anchor_s:.3f}",
                f"{stats['mean_similarity_to_centroid']:.5f}",
            )
        )
        if args.two_level_n:
            big = write_blobs(tmp / "big", args.two_level_n, args.dim, centres=args.two_level_k, seed=1)
            flat_s, flat = ours(
                big,
                tmp / "flat",
                args.two_level_k,
                args.niter,
                0,
                args.max_points_per_centroid,
                two_level="off",
                init="random",
            )
            two_s, two = ours(
                big,
                tmp / "two",
                args.two_level_k,
                args.niter,
                0,
                args.max_points_per_centroid,
                two_level="on",
                init="random",
            )
            print(f"\n{args.two_level_n:,} x {args.dim}, k {args.two_level_k:,}\n")
            print(row("mode", "seconds", "ratio", "mean similarity to centroid", "empty clusters"))
            print(row("---", "---:", "---:", "---:", "---:"))
            print(
                row(
                    "flat (anchor)",
                    f"{flat_s:.1f}",
                    "1.000",
                    f"{flat['mean_similarity_to_centroid']:.5f}",
                    flat["empty_clusters"],
                )
            )
            print(
                row(
                    "two-level",
                    f"{two_s:.1f}",
                    f"{two_s / flat_s:.3f}",
                    f"{two['mean_similarity_to_centroid']:.5f}",
                    two["empty_clusters"],
                )
            )


if __name__ == "__main__":
    main()
